#!/usr/bin/env bash
# Compare `strata-img bench` with `qemu-img bench` on the same image, one
# row per workload, and print the speed ratio (QEMU's time / strata's
# time: above 1.00 means strata is faster).  Not a test: run it by hand on
# a quiet machine.
#
#   bench/img-bench.sh [-f raw|qcow2] [-s SIZE] [-c COUNT] [BUILD_DIR]
#
# Each workload runs on a fresh copy of the same image for each tool, so
# neither tool benefits from blocks the other allocated.  "rand" rows use
# a 4 KiB stride of 7919 blocks, which wraps around the image and visits
# blocks in a scattered order that both tools follow identically
# (qemu-img bench has no random mode).
set -euo pipefail

fmt=qcow2
size=4G
count=20000
while getopts "f:s:c:" o; do
  case $o in
    f) fmt=$OPTARG ;;
    s) size=$OPTARG ;;
    c) count=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
simg=$build/strata-img
work=$(mktemp -d "${TMPDIR:-/var/tmp}/strata-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The image both tools start from: half of it written, so reads hit data.
qemu-img create -q -f "$fmt" "$work/base" "$size"
qemu-img bench -q -w -c "$(( $(numfmt --from=iec "$size") / 2 / 1048576 ))" \
  -s 1M -d 4 --pattern=90 -f "$fmt" "$work/base"

run() {  # tool args... -> seconds
  local out
  out=$("$@" 2>&1) || { echo "fail"; return; }
  sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out"
}

printf '%-28s %10s %10s %8s\n' workload "strata s" "qemu s" ratio
for cache in none writeback; do
  for rw in read write; do
    for pat in seq rand; do
      w=; [[ $rw == write ]] && w=-w
      if [[ $pat == seq ]]; then args=(-s 64k -S 64k); else args=(-s 4k -S $((4096 * 7919))); fi
      cp --sparse=always "$work/base" "$work/a"
      cp --sparse=always "$work/base" "$work/b"
      ts=$(run "$simg" bench $w -t $cache -c "$count" -d 16 "${args[@]}" -f "$fmt" "$work/a")
      tq=$(run qemu-img bench $w -t $cache -c "$count" -d 16 "${args[@]}" -f "$fmt" "$work/b")
      ratio=$(awk -v s="$ts" -v q="$tq" 'BEGIN { if (s+0 > 0 && q+0 > 0) printf "%.2f", q / s; else print "n/a" }')
      printf '%-28s %10s %10s %8s\n' "$fmt $cache $rw $pat" "$ts" "$tq" "$ratio"
    done
  done
done
