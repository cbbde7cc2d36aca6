#!/usr/bin/env bash
# Compare `strata-img map --output=json` with `qemu-img map --output=json`
# on the same chains, on tmpfs (/dev/shm) and on the disk under TMPDIR:
# one row per case with the best wall time of each, the ratio (strata /
# qemu: below 1.00 means strata is faster) and whether the two outputs
# are identical.  Not a test: run it by hand on a quiet machine.
#
#   bench/map-bench.sh [-s SIZE] [-r REPEAT] [BUILD_DIR]
#
# Shapes, as real images look (a fully written base under overlays):
#   fragmented  an overlay holding 10 % of its 64 KiB clusters, written
#               at random (a few thousand scattered extents per GiB)
#   sequential  an overlay holding its first 10 %, written in order
# A format must answer block status from its metadata: an lseek per
# extent walks the page cache on tmpfs and turns seconds into minutes.
set -euo pipefail

size=1G
repeat=3
while getopts "s:r:" o; do
  case $o in
    s) size=$OPTARG ;;
    r) repeat=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
simg=$build/strata-img
[[ -x $simg ]] || { echo "map-bench: $simg not built (make)" >&2; exit 1; }
bytes=$(numfmt --from=iec "$size")
clusters=$((bytes / 65536))

best() { # best wall time of REPEAT runs of "$@" (output to $out)
  local b= t s e
  for ((i = 0; i < repeat; i++)); do
    s=$(date +%s%N); "$@" >"$out"; e=$(date +%s%N)
    t=$(((e - s) / 1000))
    [[ -z $b || $t -lt $b ]] && b=$t
  done
  echo "$b"
}

make_chain() { # DIR SHAPE
  local d=$1
  qemu-img create -q -f qcow2 "$d/base.qcow2" "$size"
  qemu-io -f qcow2 -c "write -P 1 0 $size" "$d/base.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/top.qcow2"
  python3 - "$2" "$clusters" >"$d/cmds" <<'PY'
import random, sys
shape, n = sys.argv[1], int(sys.argv[2])
random.seed(1)
picked = random.sample(range(n), n // 10) if shape == "fragmented" \
    else range(n // 10)
for i in picked:
    print(f"write -P 2 {i * 65536} 65536")
PY
  qemu-io -f qcow2 "$d/top.qcow2" <"$d/cmds" >/dev/null
}

printf '%-10s %-11s %10s %10s %7s %s\n' where shape "qemu (ms)" \
  "strata (ms)" ratio output
for where in /dev/shm "${TMPDIR:-/var/tmp}"; do
  for shape in fragmented sequential; do
    d=$(mktemp -d "$where/strata-map-bench.XXXXXX")
    trap 'rm -rf "$d"' EXIT
    make_chain "$d" "$shape"
    out=$d/q.json; q=$(best qemu-img map --output=json "$d/top.qcow2")
    out=$d/s.json; s=$(best "$simg" map --output=json "$d/top.qcow2")
    same=differs; cmp -s "$d/q.json" "$d/s.json" && same=identical
    printf '%-10s %-11s %10.1f %10.1f %7.2f %s\n' "$where" "$shape" \
      "$(echo "$q / 1000" | bc -l)" "$(echo "$s / 1000" | bc -l)" \
      "$(echo "$s / $q" | bc -l)" "$same"
    rm -rf "$d"
    trap - EXIT
  done
done
