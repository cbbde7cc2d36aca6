#!/usr/bin/env bash
# Compare `strata-img bench` with `qemu-img bench` on the same images, one
# row per workload, and print the speed ratio (QEMU's time / strata's
# time: above 1.00 means strata is faster).  Not a test: run it by hand on
# a quiet machine.
#
#   bench/img-bench.sh [-f raw|qcow2] [-s SIZE] [-F FIXTURE_SIZE] [-c COUNT]
#                      [BUILD_DIR]
#
# Images, on every bench root (tmpfs /dev/shm and the disk under TMPDIR,
# or $BENCH_ROOT):
#   half        a SIZE (default 4G) image of format -f, half of it written
#               in 1 MiB pieces, so reads hit data
#   fragmented  bench/fixture.sh's fragmented chain at FIXTURE_SIZE
#               (default 4G; qcow2 only): the top of base <- mid <- top,
#               overlays holding 10 % scattered 64 KiB clusters each
# Each workload runs on a fresh copy of the image (of the top, for the
# chain) for each tool, so neither tool benefits from clusters the other
# allocated.  "rand" rows use a 4 KiB stride of 7919 blocks, which wraps
# around the image and visits blocks in a scattered order that both tools
# follow identically (qemu-img bench has no random mode).
set -euo pipefail

fmt=qcow2
size=4G
fsize=4G
count=20000
while getopts "f:s:F:c:" o; do
  case $o in
    f) fmt=$OPTARG ;;
    s) size=$OPTARG ;;
    F) fsize=$OPTARG ;;
    c) count=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
# shellcheck source=bench/fixture.sh
. "$(dirname "$0")/fixture.sh"
bench_tools "${1:-}"

run() {  # tool args... -> seconds
  local out
  out=$("$@" 2>&1) || { echo "fail"; return; }
  sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out"
}

# rows DIR IMAGE LABEL: every workload on copies of DIR/IMAGE made in DIR
# (so a chain's relative backing names still resolve).
rows() {
  local d=$1 img=$2 label=$3 ext=${2##*.} w args ts tq ratio
  for cache in none writeback; do
    for rw in read write; do
      for pat in seq rand; do
        w=; [[ $rw == write ]] && w=-w
        if [[ $pat == seq ]]; then args=(-s 64k -S 64k); else args=(-s 4k -S $((4096 * 7919))); fi
        cp --sparse=always "$d/$img" "$d/a.$ext"
        cp --sparse=always "$d/$img" "$d/b.$ext"
        ts=$(run "$simg" bench $w -t $cache -c "$count" -d 16 "${args[@]}" -f "$fmt" "$d/a.$ext")
        tq=$(run qemu-img bench $w -t $cache -c "$count" -d 16 "${args[@]}" -f "$fmt" "$d/b.$ext")
        ratio=$(awk -v s="$ts" -v q="$tq" 'BEGIN { if (s+0 > 0 && q+0 > 0) printf "%.2f", q / s; else print "n/a" }')
        printf '%-10s %-38s %10s %10s %8s\n' "$where" \
          "$label $cache $rw $pat" "$ts" "$tq" "$ratio"
      done
    done
  done
  rm -f "$d/a.$ext" "$d/b.$ext"
}

printf '%-10s %-38s %10s %10s %8s\n' where workload "strata s" "qemu s" ratio
for where in $(bench_roots); do
  work=$(mktemp -d "$where/strata-bench.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # The image both tools start from: half of it written, so reads hit data.
  qemu-img create -q -f "$fmt" "$work/base.img" "$size"
  qemu-img bench -q -w -c "$(( $(numfmt --from=iec "$size") / 2 / 1048576 ))" \
    -s 1M -d 4 --pattern=90 -f "$fmt" "$work/base.img" >/dev/null
  rows "$work" base.img "half $fmt ($size)"
  rm -f "$work/base.img"
  if [[ $fmt == qcow2 ]]; then
    make_fixture "$work" fragmented "$fsize"
    rows "$work" top.qcow2 "fragmented ($fsize)"
  fi
  rm -rf "$work"
  trap - EXIT
done
