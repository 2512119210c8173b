"""Loss recovered over processes: 2 CPU processes x 2 fake devices, each passing its own rows of
the batch to `evaluate.lm_losses` with the tiny GPT-2 under fsdp_tp, give the CE and KL means
that 1 process with 4 devices (and one without a mesh) gives on the whole batch."""

import json
import os
import sys

import numpy as np

from tests import multiprocess

TIMEOUT_S = 120
CHILD = """
import json, sys
import numpy as np
from gsae_jax import distributed, sharding
from gsae_jax import lm as lm_lib
from gsae_jax.eval import evaluate

folder, mesh = sys.argv[1:3]
flags = dict(a[2:].split("=", 1) for a in sys.argv[3:])  # tests.multiprocess.start's flags
count, index = int(flags.get("num_processes", 1)), int(flags.get("process_id", 0))
if count > 1:
  distributed.initialize("on", flags["coordinator_address"], count, index)
lm, _ = lm_lib.load(folder, mesh=sharding.make_mesh(2, 2) if mesh == "2x2" else None,
                    strategy="fsdp_tp")
rng = np.random.default_rng(0)
batches = []
for _ in range(2):  # two global batches of 8 windows; BOS first and once inside a window
  tokens = rng.integers(2, lm.config.vocab_size, (8, 24)).astype(np.int32)
  tokens[:, 0] = tokens[5, 11] = lm.config.bos_token_id
  rows = 8 // count
  batches.append(tokens[index * rows:(index + 1) * rows])
passes = evaluate.lm_losses(lm, batches, "blocks.1.resid_pre",
                            {"half": (lambda a: 0.5 * a, None)}, chunk_bytes=4 * 4 * 4000 * 5)
print("RESULT", json.dumps({"ce": passes.ce, "kl": passes.kl, "tokens": passes.tokens}), flush=True)
"""


def _run(folder, count, devices, mesh) -> list[dict]:
  procs = multiprocess.start([sys.executable, "-c", CHILD, folder, mesh], count, devices,
                             dict(os.environ, PYTHONPATH=multiprocess.ROOT))
  return [json.loads(out.split("RESULT ", 1)[1]) for out, _ in multiprocess.finish(procs, TIMEOUT_S)]


def test_two_processes_reduce_to_the_one_process_losses(tiny_lm):
  two = _run(tiny_lm, 2, 2, "2x2")
  one, = _run(tiny_lm, 1, 4, "2x2")
  plain, = _run(tiny_lm, 1, 1, "none")
  assert two[0] == two[1]  # every process returns the global means
  assert one["tokens"] == two[0]["tokens"] == plain["tokens"] == 2 * (8 * 23 - 1)
  for ref in (one, plain):
    for kind in ("ce", "kl"):
      assert ref[kind].keys() == two[0][kind].keys()
      for name, value in ref[kind].items():
        np.testing.assert_allclose(two[0][kind][name], value, rtol=1e-5, err_msg=f"{kind} {name}")
  assert two[0]["kl"]["half"] > 1e-3 and two[0]["ce"]["zero"] != two[0]["ce"]["clean"]
