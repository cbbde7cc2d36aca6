#!/usr/bin/env bash
# Compare `strata-img convert` with `qemu-img convert` on the same inputs
# and options, one row per case: wall time of each, the time ratio
# (strata / qemu: below 1.00 means strata is faster) and the peak RSS of
# each (from /usr/bin/time).  Not a test: run it by hand on a quiet
# machine.
#
#   bench/convert-bench.sh [-s SIZE] [-F FIXTURE_SIZE] [-r REPEAT] [-C]
#                          [-i INPUTS] [-k INPUTS] [-o OLD_BUILD] [BUILD_DIR]
#
# -i and -k name the inputs of the plain and of the -c rows (default
# "half chain fragmented sequential" and "half fragmented halfc"; "" runs
# none of them), e.g. -i "fragmented sequential" -k "" for the issue's
# uncompressed rows alone.  -o adds, on the plain rows, the time of
# another build's strata-img (an older commit) and its ratio to qemu-img
# from the same run, so a change is shown against the same noise.
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
#
# Then the `convert -c` rows (-C: only those), zlib and zstd, in order
# and with -W, on half, fragmented and
#   halfc       SIZE/16 of clusters that each compress to about half (32
#               KiB of seeded random bytes, 32 KiB of zeros), where packing
#               compressed clusters across host clusters halves the output
# with the output size of each tool and their ratio.
set -euo pipefail

size=4G
fsize=4G
repeat=3
only_c=0
inputs="half chain fragmented sequential"
c_inputs="half fragmented halfc"
old_build=
while getopts "s:F:r:Ci:k:o:" o; do
  case $o in
    s) size=$OPTARG ;;
    F) fsize=$OPTARG ;;
    r) repeat=$OPTARG ;;
    C) only_c=1 ;;
    i) inputs=$OPTARG ;;
    k) c_inputs=$OPTARG ;;
    o) old_build=$(cd "$OPTARG" && pwd) ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
# shellcheck source=bench/fixture.sh
. "$(dirname "$0")/fixture.sh"
bench_tools "${1:-}"
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

# Run "tool args... OUT" timed into $work/time, from the same start as
# every run; false (the error printed) when it fails.
timed() {
  local out=$1
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
  if ! bench_time /dev/null "$@" "$work/$out" >"$work/time" 2>"$work/err"; then
    cat "$work/err" >&2
    return 1
  fi
}

# One run of "tool args... OUT": "microseconds rss_kib", or "fail fail".
once() {
  local out=$1 t r
  timed "$@" || { echo "fail fail"; return; }
  rm -f "$work/$out"
  read -r t r <"$work/time"
  echo "$t $r"
}

# secs MICROSECONDS: seconds as the rows print them ("fail" stays).
secs() { awk -v t="$1" 'BEGIN { if (t ~ /^[0-9]+$/) printf "%.2f", t / 1e6; else print t }'; }

printf '%-10s %-30s %9s %9s %7s %12s %12s%s\n' where case "strata s" \
  "qemu s" ratio "strata RSS" "qemu RSS" "${old_build:+   (-o build: s, ratio)}"
for where in $( ((only_c)) || bench_roots); do
  for src in $inputs; do
    work=$(mktemp -d "$where/strata-convert-bench.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    in=$(make_input "$work" "$src")
    label=$src
    [[ $src == half || $src == chain ]] && label="$src ($size)"
    [[ $src == fragmented || $src == sequential ]] && label="$src ($fsize)"
    for v in "${variants[@]}"; do
      read -ra opts <<<"$v"
      ts= rs= tq= rq= to= ro=
      for ((i = 0; i < repeat; i++)); do
        read -r t r < <(once s.out "$simg" convert "${opts[@]}" "$in")
        [[ $t == fail ]] && { ts=fail; rs=0; break; }
        bench_keep ts rs "$t" "$r"
        read -r t r < <(once q.out qemu-img convert "${opts[@]}" "$in")
        [[ $t == fail ]] && { tq=fail; rq=0; break; }
        bench_keep tq rq "$t" "$r"
        if [[ -n $old_build ]]; then
          read -r t r < <(once o.out "$old_build/strata-img" convert "${opts[@]}" "$in")
          [[ $t == fail ]] && { to=fail; ro=0; break; }
          bench_keep to ro "$t" "$r"
        fi
      done
      ratio=$(awk -v s="$ts" -v q="$tq" 'BEGIN { if (q + 0 > 0) printf "%.2f", s / q; else print "n/a" }')
      before=
      if [[ -n $old_build ]]; then
        before=$(awk -v s="$to" -v q="$tq" 'BEGIN { if (q + 0 > 0) printf "   before %6.2f %5.2f", s / 1e6, s / q; else print "   before n/a" }')
      fi
      printf '%-10s %-30s %9s %9s %7s %8s MiB %8s MiB%s\n' "$where" \
        "$label $v" "$(secs "$ts")" "$(secs "$tq")" "$ratio" "$((rs / 1024))" "$((rq / 1024))" "$before"
    done
    rm -rf "$work"
    trap - EXIT
  done
done

# ---- convert -c: time and output size ----

c_variants=("-c -O qcow2" "-c -W -O qcow2"
  "-c -O qcow2 -o compression_type=zstd"
  "-c -W -O qcow2 -o compression_type=zstd")

# make_halfc DIR: the half-compressible input; prints the image to read.
make_halfc() {
  /usr/bin/python3 - "$1/halfc.raw" $((bytes / 16 / 65536)) <<'PY'
import random, sys
rnd = random.Random(20)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(rnd.randbytes(32768) + bytes(32768))
PY
  qemu-img convert -f raw -O qcow2 "$1/halfc.raw" "$1/halfc.qcow2"
  rm -f "$1/halfc.raw"
  echo "$1/halfc.qcow2"
}

# One run of "tool args... OUT": "microseconds rss_kib output_bytes", or
# "fail fail fail".
once_sized() {
  local out=$1 t r
  timed "$@" || { echo "fail fail fail"; return; }
  read -r t r <"$work/time"
  echo "$t $r $(stat -c %s "$work/$out")"
  rm -f "$work/$out"
}

mb() { awk -v b="$1" 'BEGIN { if (b + 0 > 0) printf "%.1f", b / 1e6; else print "fail" }'; }

[[ -z $c_inputs ]] && exit 0
echo
printf '%-10s %-44s %8s %8s %6s %9s %9s %6s\n' where "case (convert -c)" \
  "strata s" "qemu s" ratio "strata MB" "qemu MB" size
for where in $(bench_roots); do
  for src in $c_inputs; do
    work=$(mktemp -d "$where/strata-convert-bench.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    case $src in
      halfc) in=$(make_halfc "$work"); label="halfc ($((mib / 16))M)" ;;
      half) in=$(make_input "$work" half); label="half ($size)" ;;
      *) in=$(make_input "$work" "$src"); label="$src ($fsize)" ;;
    esac
    for v in "${c_variants[@]}"; do
      read -ra opts <<<"$v"
      ts= rs= tq= rq= zs= zq=
      for ((i = 0; i < repeat; i++)); do
        read -r t r z < <(once_sized s.out "$simg" convert "${opts[@]}" "$in")
        [[ $t == fail ]] && { ts=fail; rs=0; zs=0; break; }
        bench_keep ts rs "$t" "$r"
        zs=$z
        read -r t r z < <(once_sized q.out qemu-img convert "${opts[@]}" "$in")
        [[ $t == fail ]] && { tq=fail; rq=0; zq=0; break; }
        bench_keep tq rq "$t" "$r"
        zq=$z
      done
      ratio=$(awk -v s="$ts" -v q="$tq" 'BEGIN { if (q + 0 > 0) printf "%.2f", s / q; else print "n/a" }')
      zratio=$(awk -v s="$zs" -v q="$zq" 'BEGIN { if (q + 0 > 0) printf "%.2f", s / q; else print "n/a" }')
      printf '%-10s %-44s %8s %8s %6s %9s %9s %6s\n' "$where" \
        "$label ${v#-c }" "$(secs "$ts")" "$(secs "$tq")" "$ratio" "$(mb "$zs")" "$(mb "$zq")" \
        "$zratio"
    done
    rm -rf "$work"
    trap - EXIT
  done
done
