#!/usr/bin/env bash
# Multi-process training on one machine (CPU), for testing multi-host code paths.
# Starts NUM_PROCESSES copies of the train binary that meet through jax.distributed on
# 127.0.0.1 and use gloo collectives; each process gets DEVICES_PER_PROCESS virtual CPU devices.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh \
#     --config=configs/default.py --workdir=/tmp/mp --config.mesh.data=2 --config.mesh.fsdp=2
#
# Every argument goes to `python -m decoderjax.train`. Logs: WORKDIR/process_N.log.
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-$(
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
)}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
export JAX_PLATFORMS=cpu

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  "$PYTHON" -m decoderjax.train "$@" \
    --coordinator_address="127.0.0.1:${PORT}" --num_processes="${NUM_PROCESSES}" \
    --process_id="$i" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log:" >&2
    tail -n 20 "${LOG_DIR}/process_${i}.log" >&2
    status=1
  fi
done
cat "${LOG_DIR}/process_0.log"
exit $status
