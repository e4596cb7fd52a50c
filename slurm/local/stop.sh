#!/usr/bin/env bash
# Stop the private Slurm that slurm/local/start.sh started: cancel its jobs, shut down
# slurmctld and slurmd, stop its munged. Only processes named in its own pid files are
# signalled. Safe to run when nothing is running.
set -uo pipefail
STATE=${MMSCALE_SLURM_DIR:-/tmp/mmscale-slurm}
export SLURM_CONF=$STATE/etc/slurm.conf

pid_of() {  # the pid in a pid file, if that process is alive
  local pid
  pid=$(cat "$STATE/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_gone() {  # pid seconds
  for _ in $(seq 1 "$2"); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  return 1
}

if [ -f "$SLURM_CONF" ] && pid_of slurmctld >/dev/null; then
  # jobs first, so no training process outlives the cluster (KillWait bounds the wait)
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    kill_wait=$(awk -F= '/^KillWait=/ {print $2}' "$SLURM_CONF")
    for _ in $(seq 1 $(( ${kill_wait:-30} + 30 ))); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  scontrol shutdown >/dev/null 2>&1
fi
for pidfile in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid" "$STATE/run/munged.pid"; do
  [ -f "$pidfile" ] || continue
  daemon=$(basename "$pidfile" .pid)
  if pid=$(pid_of "$daemon"); then
    [ "$daemon" = munged ] && kill -TERM "$pid" 2>/dev/null
    wait_gone "$pid" 20 || { kill -TERM "$pid" 2>/dev/null; wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null; }
  fi
done
echo "slurm/local/stop.sh: stopped ($STATE)"
