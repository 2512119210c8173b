#!/usr/bin/env bash
# Runs N JAX processes on this machine, each with D fake CPU devices, as one multi-process job
# (the same code path as a multi-host TPU pod or GPU cluster, collectives through gloo).
#
#   launch/local_multiprocess.sh N D launch.train --config=experiments/synthetic.py --workdir=/tmp/mp
#   LOG_DIR=/tmp/mp_harvest_logs launch/local_multiprocess.sh 2 2 launch.harvest \
#       --config=experiments/harvest_gemma3_270m_cpu.py --config.mesh.data=2 --config.mesh.model=2
#
# Each process i gets: --coordinator_address=localhost:$PORT --num_processes=N --process_id=i
# and XLA_FLAGS=--xla_force_host_platform_device_count=D. PORT defaults to a free port.
# Process i's output goes to $LOG_DIR/process_i.log (default: <workdir>/logs or ./mp_logs).
# If one process fails, the others are stopped (a peer waiting in a collective would hang).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS MODULE [flags...]" >&2
  exit 2
fi
N=$1; D=$2; MODULE=$3; shift 3
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
WORKDIR=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -1)
LOG_DIR=${LOG_DIR:-${WORKDIR:+$WORKDIR/logs}}
LOG_DIR=${LOG_DIR:-mp_logs}
mkdir -p "$LOG_DIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
    "$PYTHON" -m "$MODULE" "$@" --coordinator_address="localhost:$PORT" \
    --num_processes="$N" --process_id="$i" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $N processes x $D devices (coordinator localhost:$PORT); logs in $LOG_DIR" >&2

status=0
for ((i = 0; i < N; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOG_DIR/process_$i.log" >&2
    status=1
    cleanup
  fi
done
[[ $status == 0 ]] && cat "$LOG_DIR/process_0.log"
exit $status
