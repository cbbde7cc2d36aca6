#!/usr/bin/env bash
# How strata's costs grow with the image: on scattered chains of about
# 16 K, 64 K and 256 K extents, the time and peak RSS of map, convert,
# check and block-stream, and the NBD server's 4 KiB random read and write
# rate, strata's tool beside QEMU's in the same run.  Not a test: run it by
# hand on a quiet machine.
#
#   bench/scale-bench.sh [BUILD_DIR]
#   SCALE_BENCH_SIZES="2G 8G 32G"  image sizes (the chain's virtual size)
#   SCALE_BENCH_PCT=15             % of 64 KiB clusters in each overlay
#   SCALE_BENCH_SHM_MAX=8G         larger sizes run only on the disk root
#   SCALE_BENCH_SECS=5             seconds per fio run
#   SCALE_BENCH_REPEAT=1           runs per tool row (the best is kept)
#   BENCH_ROOT=DIR                 one root instead of /dev/shm and the disk
#
# The chain is fixture.sh's make_scattered: an empty base under two
# overlays, each holding PCT % of its clusters picked at random, so the
# extents grow with the size while the data stays at 2 x PCT % of it.
# Linear means a constant time per extent (the us/ext column) down a
# size's rows; flat means a constant NBD rate.  The closing summary gives
# strata's growth per operation, largest size over smallest (1.00: linear
# or flat).  Ratios: time rows strata / qemu (below 1 is faster), NBD rows
# strata IOPS / qemu-nbd IOPS (above 1 is faster).  Tool times are wall
# times and peak RSS from /usr/bin/time; the daemons' RSS is their VmHWM.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
. "$top/bench/fixture.sh"
sizes=${SCALE_BENCH_SIZES:-2G 8G 32G}
pct=${SCALE_BENCH_PCT:-15}
shm_max=$(numfmt --from=iec "${SCALE_BENCH_SHM_MAX:-8G}")
secs=${SCALE_BENCH_SECS:-5}
repeat=${SCALE_BENCH_REPEAT:-1}
simg=$build/strata-img
for b in strata-img stratad strata-nbd; do
  [[ -x $build/$b ]] || { echo "scale-bench: $build/$b not built" >&2; exit 1; }
done
d=
pids=()
summary=$(mktemp)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -n $d ]] && rm -rf "$d"
  rm -f "$summary"
}
trap cleanup EXIT

# run_best CMD...: "SECONDS PEAK_KIB" of the fastest of REPEAT runs
run_best() {
  local best= rss=0 s e t m
  for ((i = 0; i < repeat; i++)); do
    rm -f "$d/out.qcow2"
    s=$(date +%s%N)
    /usr/bin/time -f %M -o "$d/rss" "$@" >/dev/null
    e=$(date +%s%N)
    t=$((e - s)) m=$(tail -1 "$d/rss")
    if [[ -z $best || $t -lt $best ]]; then best=$t rss=$m; fi
  done
  rm -f "$d/out.qcow2"
  echo "$(echo "$best / 1000000000" | bc -l) $rss"
}

# row ROOT SIZE EXTENTS OP Q_SECS Q_KIB S_SECS S_KIB: one time row
row() {
  local us ratio
  us=$(echo "$7 * 1000000 / $3" | bc -l)
  ratio=$(echo "$7 / $5" | bc -l)
  printf '%-9s %5s %8d %-13s %9.3f %9.3f %6.2f %9.1f %9.1f %9.2f\n' \
    "$1" "$2" "$3" "$4" "$5" "$7" "$ratio" "$(echo "$6 / 1024" | bc -l)" \
    "$(echo "$8 / 1024" | bc -l)" "$us"
  echo "$1 $4 $2 $us" >>"$summary"
}

# nbd_row ROOT SIZE EXTENTS OP Q_IOPS Q_MIB S_IOPS S_MIB
nbd_row() {
  local us ratio
  us=$(echo "1000000 / $7" | bc -l)
  ratio=$(echo "$7 / $5" | bc -l)
  printf '%-9s %5s %8d %-13s %9.0f %9.0f %6.2f %9.1f %9.1f %9.2f\n' \
    "$1" "$2" "$3" "$4" "$5" "$7" "$ratio" "$6" "$8" "$us"
  echo "$1 $4 $2 $us" >>"$summary"
}

hwm_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# fio_iops URI RW: 4 KiB random IOPS at iodepth 32 over the whole export
fio_iops() {
  fio --name=s --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 \
    --time_based --runtime="$secs" --size="$bytes" --output-format=json |
    /usr/bin/python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]
print(j["read"]["iops"] + j["write"]["iops"])'
}

# nbd NAME: "READ_IOPS WRITE_IOPS PEAK_MIB" of NAME serving a copy of top
nbd() {
  local sock=$d/$1.sock img=$d/nbd-$1.qcow2 pid r w rss uri
  cp --sparse=always "$d/top.qcow2" "$img"
  rm -f "$sock"
  case $1 in
    qemu) qemu-nbd -f qcow2 -t -e 2 -k "$sock" "$img" & ;;
    strata) "$build/strata-nbd" -f qcow2 -t -e 2 -k "$sock" "$img" & ;;
  esac
  pid=$!
  pids+=("$pid")
  while [[ ! -S $sock ]]; do sleep 0.05; done
  uri="nbd+unix:///?socket=$sock"
  r=$(fio_iops "$uri" randread)
  w=$(fio_iops "$uri" randwrite)
  rss=$(hwm_mib "$pid")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$img"
  echo "$r $w $rss"
}

# stream: "QSD_SECS QSD_MIB STRATAD_SECS STRATAD_MIB" for block-stream of
# top (no base: everything mid holds comes up)
stream() {
  STRATAD=$build/stratad QMP_PY=$top/tests/integration DIR=$d \
    /usr/bin/python3 - <<'EOF'
import os, shutil, subprocess, sys, time
sys.path.insert(0, os.environ["QMP_PY"])
from harness.qmp import QMP

d = os.environ["DIR"]
out = []
for name, exe in (("qsd", shutil.which("qemu-storage-daemon")),
                  ("stratad", os.environ["STRATAD"])):
    img, sock = f"{d}/stream-{name}.qcow2", f"{d}/{name}.sock"
    subprocess.run(["cp", "--sparse=always", f"{d}/top.qcow2", img],
                   check=True)
    proc = subprocess.Popen([exe, "--chardev",
                             f"socket,id=m,path={sock},server=on,wait=off",
                             "--monitor", "chardev=m"],
                            stdout=subprocess.DEVNULL)
    q = QMP(sock, timeout=3600)
    q.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                               "file": {"driver": "file", "filename": img}})
    t = time.monotonic()
    q.execute("block-stream", {"job-id": "j", "device": "top"})
    q.event("BLOCK_JOB_COMPLETED", timeout=3600)
    t = time.monotonic() - t
    with open(f"/proc/{proc.pid}/status") as f:
        rss = [int(l.split()[1]) for l in f if l.startswith("VmHWM:")][0]
    q.cmd("quit")
    q.close()
    proc.wait()
    os.unlink(img)
    out += [f"{t:.3f}", str(rss)]
print(" ".join(out))
EOF
}

printf '%-9s %5s %8s %-13s %9s %9s %6s %9s %9s %9s\n' root size extents op \
  "qemu" "strata" ratio "qemu MiB" "str. MiB" "us/ext"
printf '%-9s %5s %8s %-13s %9s %9s %6s %9s %9s %9s\n' "" "" "" "" \
  "s | IOPS" "s | IOPS" "" "peak RSS" "peak RSS" "| us/req"
for root in $(bench_roots); do
  tmpfs=0
  [[ $(stat -f -c %T "$root") == tmpfs ]] && tmpfs=1
  for size in $sizes; do
    bytes=$(numfmt --from=iec "$size")
    if ((tmpfs && bytes > shm_max)); then
      printf '%-9s %5s skipped: larger than SCALE_BENCH_SHM_MAX on tmpfs\n' \
        "$root" "$size"
      continue
    fi
    d=$(mktemp -d "$root/strata-scale.XXXXXX")
    make_scattered "$d" "$size" "$pct"
    ext=$(qemu-img map --output=json "$d/top.qcow2" | grep -c '"start"')
    t=$d/top.qcow2
    read -r qs qm < <(run_best qemu-img map --output=json "$t")
    read -r ss sm < <(run_best "$simg" map --output=json "$t")
    row "$root" "$size" "$ext" map "$qs" "$qm" "$ss" "$sm"
    read -r qs qm < <(run_best qemu-img convert -O qcow2 "$t" "$d/out.qcow2")
    read -r ss sm < <(run_best "$simg" convert -O qcow2 "$t" "$d/out.qcow2")
    row "$root" "$size" "$ext" convert "$qs" "$qm" "$ss" "$sm"
    read -r qs qm < <(run_best qemu-img check "$t")
    read -r ss sm < <(run_best "$simg" check "$t")
    row "$root" "$size" "$ext" check "$qs" "$qm" "$ss" "$sm"
    read -r qs qm ss sm < <(stream)
    row "$root" "$size" "$ext" stream "$qs" "$qm" "$ss" "$sm"
    read -r qr qw qm < <(nbd qemu)
    read -r sr sw sm < <(nbd strata)
    nbd_row "$root" "$size" "$ext" "nbd randread" "$qr" "$qm" "$sr" "$sm"
    nbd_row "$root" "$size" "$ext" "nbd randwrite" "$qw" "$qm" "$sw" "$sm"
    rm -rf "$d"
    d=
  done
done

echo
echo "strata's growth, largest size over smallest (us/ext, NBD us/req):"
/usr/bin/python3 - "$summary" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    root, *op, size, us = line.split()
    rows.setdefault((root, " ".join(op)), []).append((size, float(us)))
for (root, op), v in rows.items():
    cells = "  ".join(f"{s}: {u:8.2f}" for s, u in v)
    print(f"{root:9s} {op:13s} {cells}  growth {v[-1][1] / v[0][1]:5.2f}")
EOF
