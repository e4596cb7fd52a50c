#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, client tools) and munge, if they are not there yet.
# Root, Debian 12 (or any apt system with the same package names). Idempotent. The packages'
# own services are not started: slurm/local/start.sh runs private daemons with its own config.
set -euo pipefail

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair##*:}")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "slurm/local/install.sh: slurm and munge already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm/local/install.sh: need root to apt-get install ${need[*]}" >&2
  exit 1
fi

# keep postinst scripts from starting the distribution's services (no init system in a
# container; start.sh runs the daemons with its own configuration); an existing
# policy-rc.d is left as it is
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300 "$@"; }
# the package lists may be missing (fresh container) or stale (404 on a superseded version)
if ! apt_get install -y --no-install-recommends "${need[@]}" >/tmp/mmscale-apt.log 2>&1; then
  apt_get update >>/tmp/mmscale-apt.log 2>&1
  apt_get install -y --no-install-recommends "${need[@]}" >>/tmp/mmscale-apt.log 2>&1 || {
    tail -30 /tmp/mmscale-apt.log >&2
    exit 1
  }
fi
echo "slurm/local/install.sh: installed ${need[*]} ($(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || true))"
