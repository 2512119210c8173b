"""The compiled train step on a (data=2, model=4) mesh: the dictionary never travels whole.

Only reductions are allowed: the gradient all-reduce over 'data' (each device's own shard of every
parameter) and the decoder's partial sums [batch/data, d_in] over 'model'. No all-gather,
all-to-all or collective-permute, and no collective whose result has a full [d_in, d_sae] or
[d_sae, d_in] shape.
"""

import math
import re

import pytest

from experiments import synthetic
from gsae_jax import plan
from tests.distributed.test_plan import _compiled_step

D_IN, D_SAE, BATCH = 32, 512, 64
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2}


def collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
  """(op, [(dtype, shape) of each result]) of every collective instruction in HLO text."""
  found = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      shapes = [(t, tuple(int(s) for s in dims.split(",") if s))
                for t, dims in _SHAPE.findall(m.group(1))]
      found.append((m.group(2), shapes))
  return found


@pytest.mark.parametrize("arch", ["gated", "baseline"])
def test_no_all_gather_of_the_dictionary(arch):
  c = synthetic.get_config()
  c.sae.architecture, c.sae.d_sae, c.train.batch_size = arch, D_SAE, BATCH
  hlo = _compiled_step(c, D_IN, (2, 4)).as_text()
  ops = collectives(hlo)
  assert ops, "expected the gradient and decoder all-reduces"
  assert {op for op, _ in ops} == {"all-reduce"}, sorted({op for op, _ in ops})
  shapes = [s for _, results in ops for _, s in results]
  assert (D_IN, D_SAE) not in shapes and (D_SAE, D_IN) not in shapes
  # The local shards are what the gradient all-reduce carries, and the decoder's partial sums.
  assert (D_IN, D_SAE // 4) in shapes and (D_SAE // 4, D_IN) in shapes
  assert (BATCH // 2, D_IN) in shapes
  # Every large buffer reduced is a local shard: nothing bigger than d_in x d_sae / 4.
  assert max(math.prod(s) for s in shapes) <= D_IN * D_SAE // 4
  # The plan's collective payload accounts for what XLA reduces (scalars/vectors aside).
  xla_bytes = sum(_BYTES[t] * math.prod(s) for _, results in ops for t, s in results)
  planned = sum(x.bytes * x.count for x in plan.sae_plan(c, D_IN, 8).collectives)
  assert planned <= xla_bytes <= 1.1 * planned, (planned, xla_bytes)
