#!/usr/bin/env bash
# Install what strata needs to build and test, on Debian 12.  Idempotent:
# only packages that are not installed yet are passed to apt-get, and when
# everything is present this script does nothing and touches no network.
set -euo pipefail

packages=(
  # build
  gcc make meson ninja-build pkg-config clang libclang-rt-14-dev
  scdoc man-db
  # libraries strata links
  zlib1g-dev libzstd-dev libjansson-dev libnbd-dev
  # test peers and runners
  qemu-utils qemu-system-common libnbd-bin nbdkit fio
  python3 python3-pytest python3-pytest-xdist python3-libnbd util-linux procps strace
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "deps.sh: installing ${missing[*]}" >&2
sudo=
if [[ $(id -u) != 0 ]]; then
  sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
