"""The multi-process start decision (a pure function of flags and environment)."""

import pytest

from gsae_jax import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-010,12],cpu1",
         "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


def test_single_process_by_default():
  assert distributed.init_kwargs(env={}) is None
  assert distributed.init_kwargs(env={"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "a",
                                      "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  assert distributed.init_kwargs(env={"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_explicit_flags_win_over_slurm():
  kw = distributed.init_kwargs("auto", "10.0.0.1:1234", 4, 2, env=SLURM)
  assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}


def test_jax_environment_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.init_kwargs(env=env) == {"coordinator_address": "h:9", "num_processes": 2,
                                              "process_id": 1}


@pytest.mark.parametrize("node_list, host", [
    ("gpu[003-010,12],cpu1", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"),
    ("n[5,7-9]", "n5"), ("n[12]", "n12")])
def test_slurm_coordinator_is_first_node(node_list, host):
  kw = distributed.init_kwargs(env={**SLURM, "SLURM_STEP_NODELIST": node_list})
  assert kw == {"coordinator_address": f"{host}:{4242 % 4096 + 61440}", "num_processes": 8,
                "process_id": 5}


def test_tpu_pod_and_forced_mode_let_jax_detect():
  assert distributed.init_kwargs(env={"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}) == {}
  assert distributed.init_kwargs("on", env={}) == {}
  assert distributed.init_kwargs("off", "h:1", 2, 0, env=SLURM) is None


@pytest.mark.parametrize("args, needle", [
    (("h:1", None, 0), "--num_processes"),
    ((None, 2, 0), "--coordinator_address"),
    (("h:1", 2, 2), "0 <= process_id < num_processes"),
])
def test_incomplete_or_bad_flags_are_named(args, needle):
  with pytest.raises(ValueError, match=needle):
    distributed.init_kwargs("auto", *args, env={})


def test_bad_mode_and_env():
  with pytest.raises(ValueError, match="--distributed"):
    distributed.init_kwargs("maybe", env={})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.init_kwargs(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
