#!/usr/bin/env bash
# Compare `strata-img convert` with `qemu-img convert` on the same inputs
# and options, one row per case: wall time of each, the time ratio
# (strata / qemu: below 1.00 means strata is faster) and the peak RSS of
# each (from /usr/bin/time).  Not a test: run it by hand on a quiet
# machine.
#
#   bench/convert-bench.sh [-s SIZE] [-F FIXTURE_SIZE] [-r REPEAT] [BUILD_DIR]
#
# Inputs, each made, used and deleted in turn on every bench root (tmpfs
# /dev/shm and the disk under TMPDIR, or $BENCH_ROOT), so one root holds
# one input and one output at a time:
#   half        a SIZE (default 4G) qcow2 with every other MiB written
#   chain       a 3-deep chain of SIZE whose layers overwrite each other's
#               ranges (the middle one with 4 KiB clusters)
#   fragmented  bench/fixture.sh's chains at FIXTURE_SIZE (default 4G): a
#   sequential  written base under two overlays of 10 % each, scattered
#               64 KiB clusters or in order
# Each tool writes its own fresh output (deleted between runs), the page
# cache is shared, and the best of REPEAT runs (default 3) counts.
set -euo pipefail

size=4G
fsize=4G
repeat=3
while getopts "s:F:r:" o; do
  case $o in
    s) size=$OPTARG ;;
    F) fsize=$OPTARG ;;
    r) repeat=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
simg=$build/strata-img
# shellcheck source=bench/fixture.sh
. "$top/bench/fixture.sh"
bytes=$(numfmt --from=iec "$size")
mib=$((bytes / 1048576))

# The rows for each input: the options after `convert`.
variants=("-O qcow2" "-O raw")

# make_input DIR NAME: build input NAME in DIR; prints the image to read.
make_input() {
  local w=$1
  case $2 in
    half) # 1 MiB of data every other MiB.
      qemu-img create -q -f qcow2 "$w/half.qcow2" "$size"
      qemu-img bench -q -w -c $((mib / 2)) -s 1M -S 2M -d 8 --pattern=90 \
        "$w/half.qcow2" >/dev/null
      echo "$w/half.qcow2" ;;
    chain) # base every other MiB, mid every third, top every fifth.
      qemu-img create -q -f qcow2 "$w/base.qcow2" "$size"
      qemu-img bench -q -w -c $((mib / 2)) -s 1M -S 2M -d 8 --pattern=1 \
        "$w/base.qcow2" >/dev/null
      qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 \
        -F qcow2 "$w/mid.qcow2"
      qemu-img bench -q -w -c $((mib / 3)) -s 1M -S 3M -o 512k -d 8 \
        --pattern=2 "$w/mid.qcow2" >/dev/null
      qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$w/top.qcow2"
      qemu-img bench -q -w -c $((mib / 5)) -s 1M -S 5M -o 256k -d 8 \
        --pattern=3 "$w/top.qcow2" >/dev/null
      echo "$w/top.qcow2" ;;
    fragmented | sequential)
      make_fixture "$w" "$2" "$fsize" >&2
      echo "$w/top.qcow2" ;;
  esac
}

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

printf '%-10s %-30s %9s %9s %7s %12s %12s\n' where case "strata s" \
  "qemu s" ratio "strata RSS" "qemu RSS"
for where in $(bench_roots); do
  for src in half chain fragmented sequential; do
    work=$(mktemp -d "$where/strata-convert-bench.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    in=$(make_input "$work" "$src")
    label=$src
    [[ $src == half || $src == chain ]] && label="$src ($size)"
    [[ $src == fragmented || $src == sequential ]] && label="$src ($fsize)"
    for v in "${variants[@]}"; do
      read -ra opts <<<"$v"
      ts= rs= tq= rq=
      for ((i = 0; i < repeat; i++)); do
        read -r t r < <(once s.out "$simg" convert "${opts[@]}" "$in")
        [[ $t == fail ]] && { ts=fail; rs=0; break; }
        best_of ts rs "$t" "$r"
        read -r t r < <(once q.out qemu-img convert "${opts[@]}" "$in")
        [[ $t == fail ]] && { tq=fail; rq=0; break; }
        best_of tq rq "$t" "$r"
      done
      ratio=$(awk -v s="$ts" -v q="$tq" 'BEGIN { if (q + 0 > 0) printf "%.2f", s / q; else print "n/a" }')
      printf '%-10s %-30s %9s %9s %7s %8s MiB %8s MiB\n' "$where" \
        "$label $v" "$ts" "$tq" "$ratio" "$((rs / 1024))" "$((rq / 1024))"
    done
    rm -rf "$work"
    trap - EXIT
  done
done
