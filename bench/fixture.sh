# The benchmarks' shared image shapes; source it from a bench script.
#
#   . "$(dirname "$0")/fixture.sh"
#   bench_roots                 -> the roots to run on: $BENCH_ROOT if set,
#                                  else /dev/shm (tmpfs) and ${TMPDIR:-/var/tmp}
#   make_fixture DIR SHAPE SIZE -> DIR/base.qcow2 <- DIR/mid.qcow2 <- DIR/top.qcow2
#   make_scattered DIR SIZE PCT -> the same chain for scaling runs: an empty
#                                  base and the fragmented overlays holding
#                                  PCT % each (extents grow with SIZE, data
#                                  stays at 2 x PCT % of it)
#
# Shapes (SIZE as qemu-img takes it, e.g. 4G):
#   fragmented  the shape of a real chain: base fully written; mid and top
#               each hold 10 % of their 64 KiB clusters, picked at random
#               (seeded, so every run and every tool sees the same image),
#               a few thousand scattered extents per GiB
#   sequential  base fully written; mid holds the first 10 % of the
#               clusters and top the next 10 %, written in order
# The base holds pattern 1, mid pattern 2 and top pattern 3, all written
# by qemu-io so that neither tool under test made the images it reads.
# BENCH_FIXTURE_SEED changes the random picks (default 1).
#
# And what every bench script does around them:
#   bench_tools [BUILD_DIR]     -> sets top (the checkout), build (BUILD_DIR,
#                                  default $top/build) and simg; exits if
#                                  strata-img is not built
#   bench_time OUT CMD...       -> runs CMD, its stdout to OUT; prints
#                                  "microseconds peak_rss_kib"; CMD's status
#   bench_keep VT VR TIME RSS   -> VT keeps the smallest time, VR the largest
#                                  RSS (tools alternate, so a burst of load
#                                  from elsewhere hits both)

bench_tools() {
  top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  build=$(cd "${1:-$top/build}" && pwd)
  simg=$build/strata-img
  if [[ ! -x $simg ]]; then
    echo "$(basename "$0"): $simg not built (make)" >&2
    exit 1
  fi
}

# The clock is bash's own (EPOCHREALTIME, microseconds): a `date` process
# on each side would be timed too, tens of milliseconds under load.
bench_time() {
  local out=$1 s e rc=0 rf
  shift
  rf=$(mktemp)
  s=${EPOCHREALTIME/./}
  /usr/bin/time -f %M -o "$rf" "$@" >"$out" || rc=$?
  e=${EPOCHREALTIME/./}
  echo "$(((e - s))) $(tail -n 1 "$rf")"
  rm -f "$rf"
  return $rc
}

bench_keep() {
  local -n bt=$1 br=$2
  if [[ -z $bt || $3 -lt $bt ]]; then bt=$3; fi
  if [[ -z $br || $4 -gt $br ]]; then br=$4; fi
}

bench_roots() {
  if [[ -n ${BENCH_ROOT:-} ]]; then
    echo "$BENCH_ROOT"
  else
    echo /dev/shm
    echo "${TMPDIR:-/var/tmp}"
  fi
}

# _fixture_cmds SHAPE CLUSTERS LAYER [PCT]: qemu-io write commands for one
# overlay holding PCT % (default 10) of the clusters
_fixture_cmds() {
  /usr/bin/python3 - "$1" "$2" "$3" "${BENCH_FIXTURE_SEED:-1}" "${4:-10}" <<'PY'
import random, sys
shape, n, layer, seed, pct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
k = n * pct // 100
if shape == "fragmented":
    picked = sorted(random.Random(seed * 10 + layer).sample(range(n), k))
else:
    picked = range((layer - 2) * k, (layer - 1) * k)
for i in picked:
    print(f"write -P {layer} {i * 65536} 65536")
PY
}

make_fixture() { # DIR SHAPE SIZE
  local d=$1 shape=$2 size=$3 bytes clusters off chunk
  case $shape in fragmented | sequential) ;; *)
    echo "make_fixture: unknown shape '$shape'" >&2; return 2 ;;
  esac
  bytes=$(numfmt --from=iec "$size")
  clusters=$((bytes / 65536))
  qemu-img create -q -f qcow2 "$d/base.qcow2" "$bytes"
  # qemu-io takes at most 2 GiB per request and holds a buffer of the
  # request's size: write the base in 256 MiB pieces, so that building a
  # fixture beside other work does not run the machine out of memory.
  chunk=$((256 << 20))
  for ((off = 0; off < bytes; off += chunk)); do
    local len=$((bytes - off < chunk ? bytes - off : chunk))
    echo "write -P 1 $off $len"
  done | qemu-io -f qcow2 "$d/base.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/mid.qcow2"
  _fixture_cmds "$shape" "$clusters" 2 | qemu-io -f qcow2 "$d/mid.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$d/top.qcow2"
  _fixture_cmds "$shape" "$clusters" 3 | qemu-io -f qcow2 "$d/top.qcow2" >/dev/null
}

make_scattered() { # DIR SIZE PCT
  local d=$1 bytes clusters
  bytes=$(numfmt --from=iec "$2")
  clusters=$((bytes / 65536))
  qemu-img create -q -f qcow2 "$d/base.qcow2" "$bytes"
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/mid.qcow2"
  _fixture_cmds fragmented "$clusters" 2 "$3" | qemu-io -f qcow2 "$d/mid.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$d/top.qcow2"
  _fixture_cmds fragmented "$clusters" 3 "$3" | qemu-io -f qcow2 "$d/top.qcow2" >/dev/null
}
