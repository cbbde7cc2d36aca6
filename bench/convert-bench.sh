#!/usr/bin/env bash
# Compare `strata-img convert` with `qemu-img convert` on the same inputs
# and options, one row per case: wall time of each, the time ratio
# (strata / qemu: below 1.00 means strata is faster) and the peak RSS of
# each (from /usr/bin/time).  Not a test: run it by hand on a quiet
# machine.
#
#   bench/convert-bench.sh [-s SIZE] [-r REPEAT] [BUILD_DIR]
#
# Inputs: a SIZE (default 4G) qcow2 with every other MiB written, and a
# 3-deep chain of the same size whose layers overwrite each other's
# ranges.  Each tool writes its own fresh output (deleted between runs),
# the page cache is shared, and the best of REPEAT runs (default 3)
# counts.
set -euo pipefail

size=4G
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
work=$(mktemp -d "${TMPDIR:-/var/tmp}/strata-convert-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
bytes=$(numfmt --from=iec "$size")
mib=$((bytes / 1048576))

# Half-allocated: 1 MiB of data every other MiB.
qemu-img create -q -f qcow2 "$work/half.qcow2" "$size"
qemu-img bench -q -w -c $((mib / 2)) -s 1M -S 2M -d 8 --pattern=90 \
  "$work/half.qcow2" >/dev/null

# A chain: base writes every other MiB, mid every third (overlapping
# some of base), top every fifth; mid has 4 KiB clusters.
qemu-img create -q -f qcow2 "$work/base.qcow2" "$size"
qemu-img bench -q -w -c $((mib / 2)) -s 1M -S 2M -d 8 --pattern=1 \
  "$work/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 \
  "$work/mid.qcow2"
qemu-img bench -q -w -c $((mib / 3)) -s 1M -S 3M -o 512k -d 8 \
  --pattern=2 "$work/mid.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$work/top.qcow2"
qemu-img bench -q -w -c $((mib / 5)) -s 1M -S 5M -o 256k -d 8 \
  --pattern=3 "$work/top.qcow2" >/dev/null

# One run of "tool args... OUT": "seconds rss_kib", or "fail fail".
once() {
  local out=$1 t r
  shift
  rm -f "$work/$out"
  sync  # no writeback of an earlier run's output during this one
  # The same start for every run: free memory (root only; otherwise the
  # run that has to reclaim the page cache pays for it) and the inputs
  # read back into the cache.
  if [[ -w /proc/sys/vm/drop_caches ]]; then
    echo 1 >/proc/sys/vm/drop_caches
  fi
  cat "$work"/*.qcow2 >/dev/null
  if ! /usr/bin/time -f '%e %M' -o "$work/time" "$@" "$work/$out" \
       >/dev/null 2>"$work/err"; then
    cat "$work/err" >&2
    echo "fail fail"
    return
  fi
  rm -f "$work/$out"
  read -r t r <"$work/time"
  echo "$t $r"
}

# The two tools alternate, so a burst of load from elsewhere hits both;
# each keeps its best time and its largest RSS.
best_of() {  # var_time var_rss new_time new_rss
  local -n bt=$1 br=$2
  if [[ -z $bt ]] || awk -v a="$3" -v b="$bt" 'BEGIN { exit !(a < b) }'; then
    bt=$3
  fi
  if [[ -z $br || $4 -gt $br ]]; then br=$4; fi
}

printf '%-30s %9s %9s %7s %12s %12s\n' case "strata s" "qemu s" ratio \
  "strata RSS" "qemu RSS"
for src in half chain; do
  in=$work/$src.qcow2
  [[ $src == chain ]] && in=$work/top.qcow2
  for ofmt in qcow2 raw; do
    ts= rs= tq= rq=
    for ((i = 0; i < repeat; i++)); do
      read -r t r < <(once s.out "$simg" convert -O "$ofmt" "$in")
      [[ $t == fail ]] && { ts=fail; rs=0; break; }
      best_of ts rs "$t" "$r"
      read -r t r < <(once q.out qemu-img convert -O "$ofmt" "$in")
      [[ $t == fail ]] && { tq=fail; rq=0; break; }
      best_of tq rq "$t" "$r"
    done
    ratio=$(awk -v s="$ts" -v q="$tq" 'BEGIN { if (q + 0 > 0) printf "%.2f", s / q; else print "n/a" }')
    printf '%-30s %9s %9s %7s %9s MiB %9s MiB\n' "$src qcow2->$ofmt ($size)" \
      "$ts" "$tq" "$ratio" "$((rs / 1024))" "$((rq / 1024))"
  done
done
