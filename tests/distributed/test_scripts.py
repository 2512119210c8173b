"""The cluster scripts: the local multi-process launcher really runs a job; the TPU pod and
SLURM scripts are valid bash and pass the flags the README documents."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("local_multiprocess.sh", "tpu_pod.sh", "slurm_gpu.sbatch")


def _script(name: str) -> str:
  return os.path.join(ROOT, "launch", name)


def test_scripts_are_valid_bash():
  for name in SCRIPTS:
    proc = subprocess.run(["bash", "-n", _script(name)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{name}: {proc.stderr}"
    assert os.access(_script(name), os.X_OK), name


def test_pod_and_slurm_scripts_pass_the_distributed_flags():
  tpu = open(_script("tpu_pod.sh")).read()
  assert "gcloud compute tpus tpu-vm ssh" in tpu and "--worker=all" in tpu
  assert "--distributed=on" in tpu
  slurm = open(_script("slurm_gpu.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=1" in slurm and "srun" in slurm
  assert "--distributed=auto" in slurm


def test_local_multiprocess_script_runs_a_two_process_job(tmp_path):
  workdir = tmp_path / "run"
  cmd = [_script("local_multiprocess.sh"), "2", "2", "launch.train",
         "--config=experiments/synthetic.py", f"--workdir={workdir}", "--config.data.d_in=16",
         "--config.data.m_true=32", "--config.sae.d_sae=64", "--config.train.steps=4",
         "--config.train.batch_size=32", "--config.train.log_every=2",
         "--config.data.normalise_sample_tokens=2048", "--config.mesh.model=2"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHON=sys.executable))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 2, 'model': 2} on 4 cpu device(s)" in proc.stdout
  assert "step 4/4" in proc.stdout
  assert (workdir / "logs" / "process_1.log").exists()
  assert np.load(workdir / "params.npz")["W_dec"].shape == (64, 16)


def test_local_multiprocess_script_fails_when_a_process_fails(tmp_path):
  cmd = [_script("local_multiprocess.sh"), "2", "1", "launch.train",
         "--config=experiments/synthetic.py", f"--workdir={tmp_path}", "--config.sae.d_sae=-1"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHON=sys.executable))
  assert proc.returncode != 0
  assert "failed" in proc.stderr
