#!/usr/bin/env bash
# Compare `strata-img map --output=json` with `qemu-img map --output=json`
# on the shared chains of bench/fixture.sh (base <- mid <- top), on every
# bench root (tmpfs /dev/shm and the disk under TMPDIR, or $BENCH_ROOT):
# one row per case with the best wall time of each tool in the same run,
# the ratio (strata / qemu: below 1.00 means strata is faster), the peak
# RSS of each (/usr/bin/time %M, the largest of the runs) and whether the
# two outputs are identical.  Not a test: run it by hand on a quiet
# machine.
#
#   bench/map-bench.sh [-s "SIZES"] [-r REPEAT] [BUILD_DIR]
#
# SIZES (default "1G 4G") are the fixture sizes; both shapes run at each,
# so the rows also show whether time and memory grow with the image:
#   fragmented  mid and top each hold 10 % of their 64 KiB clusters,
#               written at random (a few thousand scattered extents per GiB)
#   sequential  mid holds the first 10 %, top the next 10 %, in order
# A format must answer block status from its metadata: an lseek per
# extent walks the page cache on tmpfs and turns seconds into minutes.
set -euo pipefail

sizes="1G 4G"
repeat=3
while getopts "s:r:" o; do
  case $o in
    s) sizes=$OPTARG ;;
    r) repeat=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
# shellcheck source=bench/fixture.sh
. "$(dirname "$0")/fixture.sh"
bench_tools "${1:-}"

printf '%-10s %-11s %5s %10s %10s %6s %9s %9s %s\n' where shape size \
  "qemu ms" "strata ms" ratio "qemu RSS" "strata RSS" output
for where in $(bench_roots); do
  for size in $sizes; do
    for shape in fragmented sequential; do
      d=$(mktemp -d "$where/strata-map-bench.XXXXXX")
      trap 'rm -rf "$d"' EXIT
      make_fixture "$d" "$shape" "$size"
      tq= rq= ts= rs=
      for ((i = 0; i < repeat; i++)); do
        read -r t r < <(bench_time "$d/q.json" qemu-img map --output=json "$d/top.qcow2")
        bench_keep tq rq "$t" "$r"
        read -r t r < <(bench_time "$d/s.json" "$simg" map --output=json "$d/top.qcow2")
        bench_keep ts rs "$t" "$r"
      done
      same=differs; cmp -s "$d/q.json" "$d/s.json" && same=identical
      printf '%-10s %-11s %5s %10.1f %10.1f %6.2f %6s MiB %6s MiB %s\n' \
        "$where" "$shape" "$size" "$(echo "$tq / 1000" | bc -l)" \
        "$(echo "$ts / 1000" | bc -l)" "$(echo "$ts / $tq" | bc -l)" \
        "$(echo "scale=1; $rq / 1024" | bc)" \
        "$(echo "scale=1; $rs / 1024" | bc)" "$same"
      rm -rf "$d"
      trap - EXIT
    done
  done
done
