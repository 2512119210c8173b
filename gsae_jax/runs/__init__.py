"""Workdir-level runs (training, harvest, evaluation, sweeps, the main job, export): the I/O
and orchestration behind the thin absl launchers in `launch/`."""
