#!/usr/bin/env bash
# Installs what the Slurm tests need (Debian packages): a controller, a node daemon, the client
# commands, munge for authentication, and shellcheck for the script lint. Idempotent and quiet:
# nothing is downloaded when everything is already there. Needs root (apt-get); without root it
# says so and exits 0, and the Slurm tests then skip with that reason.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge shellcheck)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_slurm: already installed: ${packages[*]}"
    exit 0
fi

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: cannot install ${missing[*]} (needs root and apt-get); the Slurm tests will skip" >&2
    exit 0
fi

echo "install_slurm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts try to start their services; the test fixture starts them
# itself with its own configuration, so keep invoke-rc.d from starting anything.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install_slurm: done"
