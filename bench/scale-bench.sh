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
# Each row gives, for QEMU's tool and strata's, the wall time (NBD: IOPS),
# the CPU seconds, user plus system (NBD: the server's CPU microseconds
# per request) and the peak RSS; the ratios strata / qemu of the first
# two (wall: below 1 is faster, for NBD above 1 is); and strata's CPU
# microseconds per extent (NBD: per request).  CPU time is what to read
# on a shared machine, where wall times follow the other users' load.
# Linear means a constant CPU time per extent down the sizes; flat, a
# constant CPU time per NBD request.  The closing summary gives strata's
# growth per operation, largest size over smallest (1.00: linear or flat).
# Tools are measured with /usr/bin/time; the daemons' CPU time from
# /proc/PID/stat and their RSS as VmHWM.
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

# run_best CMD...: "SECONDS CPU_SECONDS PEAK_MIB" of the run with the
# least CPU time of REPEAT runs
run_best() {
  local best= s e t u m c
  for ((i = 0; i < repeat; i++)); do
    rm -f "$d/out.qcow2"
    s=$(date +%s%N)
    /usr/bin/time -f "%U %S %M" -o "$d/rss" "$@" >/dev/null
    e=$(date +%s%N)
    read -r u c m < <(tail -1 "$d/rss")
    c=$(echo "$u + $c" | bc -l)
    if [[ -z $best ]] || (($(echo "$c < $best" | bc -l))); then
      best=$c t=$(echo "($e - $s) / 1000000000" | bc -l)
      m=$(echo "$m / 1024" | bc -l)
      echo "$t $c $m" >"$d/best"
    fi
  done
  rm -f "$d/out.qcow2"
  cat "$d/best"
}

# ratio A B: A / B, with B at least 0.01 (the clock's resolution)
ratio() { echo "$1 / ($2 + ($2 < 0.01) * (0.01 - $2))" | bc -l; }

# row ROOT SIZE EXTENTS OP Q_WALL Q_CPU Q_MIB S_WALL S_CPU S_MIB
row() {
  local us
  us=$(echo "$9 * 1000000 / $3" | bc -l)
  printf '%-9s %5s %7d %-13s %8.3f %7.3f %5.1f %8.3f %7.3f %5.1f %5.2f %5.2f %8.2f\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "${10}" \
    "$(echo "$8 / $5" | bc -l)" "$(ratio "$9" "$6")" "$us"
  echo "$1 $4 $2 $us" >>"$summary"
}

# nbd_row ROOT SIZE EXTENTS OP Q_IOPS Q_US_REQ Q_MIB S_IOPS S_US_REQ S_MIB
nbd_row() {
  printf '%-9s %5s %7d %-13s %8.0f %7.2f %5.1f %8.0f %7.2f %5.1f %5.2f %5.2f %8.2f\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "${10}" \
    "$(echo "$8 / $5" | bc -l)" "$(ratio "$9" "$6")" "$9"
  echo "$1 $4 $2 $9" >>"$summary"
}

hwm_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# cpu_ticks PID: user plus system clock ticks PID has used
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

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

# per_req PID TICKS0 IOPS: the server's CPU microseconds per request
# since TICKS0
per_req() {
  echo "($(cpu_ticks "$1") - $2) * 1000000 / $(getconf CLK_TCK) / ($3 * $secs)" |
    bc -l
}

# nbd NAME: "READ_IOPS READ_US WRITE_IOPS WRITE_US PEAK_MIB" of NAME
# serving a copy of top (US: its CPU microseconds per request)
nbd() {
  local sock=$d/$1.sock img=$d/nbd-$1.qcow2 pid r w rss uri c ru wu
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
  c=$(cpu_ticks "$pid")
  r=$(fio_iops "$uri" randread)
  ru=$(per_req "$pid" "$c" "$r")
  c=$(cpu_ticks "$pid")
  w=$(fio_iops "$uri" randwrite)
  wu=$(per_req "$pid" "$c" "$w")
  rss=$(hwm_mib "$pid")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$img"
  echo "$r $ru $w $wu $rss"
}

# stream: "SECS CPU_SECS PEAK_MIB" of qsd then of stratad for block-stream of
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
    with open(f"/proc/{proc.pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    q.cmd("quit")
    q.close()
    proc.wait()
    os.unlink(img)
    out += [f"{t:.3f}", f"{cpu:.2f}", f"{rss / 1024:.1f}"]
print(" ".join(out))
EOF
}

printf '%-9s %5s %7s %-13s %8s %7s %5s %8s %7s %5s %5s %5s %8s\n' "" "" "" "" \
  "qemu:" "" "" "strata:" "" "" ratio ratio strata
printf '%-9s %5s %7s %-13s %8s %7s %5s %8s %7s %5s %5s %5s %8s\n' root size \
  extents op "s|IOPS" "cpu s" MiB "s|IOPS" "cpu s" MiB wall cpu "cpu us"
printf '%-9s %5s %7s %-13s %8s %7s %5s %8s %7s %5s %5s %5s %8s\n' "" "" "" "" \
  "" "|us/req" "" "" "|us/req" "" "" "" "/ext|req"
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
    r=("$root" "$size" "$ext")
    row "${r[@]}" map $(run_best qemu-img map --output=json "$t") \
      $(run_best "$simg" map --output=json "$t")
    row "${r[@]}" convert $(run_best qemu-img convert -O qcow2 "$t" "$d/out.qcow2") \
      $(run_best "$simg" convert -O qcow2 "$t" "$d/out.qcow2")
    row "${r[@]}" check $(run_best qemu-img check "$t") \
      $(run_best "$simg" check "$t")
    row "${r[@]}" stream $(stream)
    read -r qr qru qw qwu qm < <(nbd qemu)
    read -r sr sru sw swu sm < <(nbd strata)
    nbd_row "${r[@]}" "nbd randread" "$qr" "$qru" "$qm" "$sr" "$sru" "$sm"
    nbd_row "${r[@]}" "nbd randwrite" "$qw" "$qwu" "$qm" "$sw" "$swu" "$sm"
    rm -rf "$d"
    d=
  done
done

echo
echo "strata's CPU time per extent (NBD: per request) in us, and its growth"
echo "from the smallest size to the largest:"
/usr/bin/python3 - "$summary" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    root, *op, size, us = line.split()
    rows.setdefault((root, " ".join(op)), []).append((size, float(us)))
for (root, op), v in rows.items():
    cells = "  ".join(f"{s}: {u:8.2f}" for s, u in v)
    # CPU time is counted in 10 ms ticks: a tool that took none has no
    # growth to show
    growth = f"{v[-1][1] / v[0][1]:5.2f}" if v[0][1] > 0 else "    -"
    print(f"{root:9s} {op:13s} {cells}  growth {growth}")
EOF
