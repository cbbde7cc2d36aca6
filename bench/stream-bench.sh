#!/usr/bin/env bash
# block-stream in stratad against qemu-storage-daemon on the same 3-deep
# qcow2 chains, on tmpfs and on the disk (fixture.sh's bench_roots), in
# two shapes: "quarter" (base fully allocated, mid holding a quarter in
# one piece, top empty) and fixture.sh's "fragmented" (base fully
# written, mid and top each holding 10 % in scattered 64 KiB clusters):
#   1. no speed limit: seconds from block-stream to BLOCK_JOB_COMPLETED,
#      each daemon on a fresh copy of the top, strata's ratio, and each
#      daemon's CPU seconds (user + system, steadier than the wall time on
#      a shared machine) and peak RSS;
#   (and 1b. the same unlimited stream when the base is reached over NBD,
#      served by qemu-nbd: the post-copy case);
#   then, on the quarter chain only:
#   2. a guest's 4 KiB random-read p99 latency over each daemon's NBD
#      export (fio, iodepth 1) with no job and during an unlimited stream
#      (stratad also with x-yield-to-guest), and each daemon's peak RSS
#      serving and streaming;
#   3. speed 100 MiB/s, then block-job-set-speed to 50 MiB/s: the rate
#      achieved over a window after each change (the first second skipped);
#   4. a plain copy of the same bytes (dd with fsync) as the ceiling.
# Caches are warm for everyone (nothing is dropped).
#   bench/stream-bench.sh [BUILD_DIR]
#   STREAM_BENCH_SIZE=1G bench/stream-bench.sh    (default 4G)
#   STREAM_BENCH_WINDOW=10                        (seconds per rate window)
#   STREAM_BENCH_SHAPES="fragmented"              (default: quarter fragmented)
#   BENCH_ROOT=DIR                                (one root instead of both)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
. "$top/bench/fixture.sh"
size=${STREAM_BENCH_SIZE:-4G}
window=${STREAM_BENCH_WINDOW:-10}
shapes=${STREAM_BENCH_SHAPES:-quarter fragmented}
work=
trap '[[ -z $work ]] || rm -rf "$work"' EXIT

fill() {  # IMAGE PATTERN START_MIB LEN_MIB, in pieces of at most 256 MiB
  local args=() off=$3 end=$(($3 + $4)) n
  while ((off < end)); do
    n=$((end - off < 256 ? end - off : 256))
    args+=(-c "write -P $2 ${off}M ${n}M")
    off=$((off + n))
  done
  qemu-io -f qcow2 "${args[@]}" "$1" >/dev/null
}

make_quarter() {
  qemu-img create -q -f qcow2 base.qcow2 "$size"
  fill base.qcow2 1 0 "$mib"
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
  fill mid.qcow2 2 $((mib / 4)) $((mib / 4))
  qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
}

mib=$(($(numfmt --from=iec "$size") / 1048576))
for root in $(bench_roots); do
for shape in $shapes; do
work=$(mktemp -d "$root/strata-stream-bench.XXXXXX")
cd "$work"
case $shape in
  quarter)
    make_quarter
    echo "== $root, quarter: base ${mib} MiB allocated, mid $((mib / 4)) MiB, top empty" ;;
  fragmented)
    make_fixture "$work" fragmented "$size"
    echo "== $root, fragmented: base ${mib} MiB allocated, mid and top 10 % each at random" ;;
esac

STRATAD=$build/stratad QMP_PY=$top/tests/integration MIB=$mib \
WINDOW=$window SHAPE=$shape /usr/bin/python3 - <<'EOF'
import os, shutil, subprocess, sys, time
sys.path.insert(0, os.environ["QMP_PY"])
from harness.qmp import QMP

MIB = 1 << 20
size = int(os.environ["MIB"]) * MIB
window = float(os.environ["WINDOW"])
daemons = {"stratad": os.environ["STRATAD"],
           "qsd": shutil.which("qemu-storage-daemon")}


def start(name, tag, src="top.qcow2"):
    shutil.copy(src, f"top-{tag}.qcow2")
    sock = f"{tag}.sock"
    proc = subprocess.Popen([daemons[name], "--chardev",
                             f"socket,id=m,path={sock},server=on,wait=off",
                             "--monitor", "chardev=m"],
                            stdout=subprocess.DEVNULL)
    q = QMP(sock, timeout=600)
    q.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                               "file": {"driver": "file",
                                        "filename": f"top-{tag}.qcow2"}})
    return proc, q


def stop(proc, q):
    q.cmd("quit")
    q.close()
    proc.wait()


def offset(q):
    return q.execute("query-block-jobs")[0]["offset"]


def rate_over(q):
    time.sleep(1)
    a, t0 = offset(q), time.monotonic()
    time.sleep(window)
    b, t1 = offset(q), time.monotonic()
    return (b - a) / (t1 - t0) / MIB


def peak_rss_mib(proc):
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0


def cpu_s(proc):
    """User plus system seconds PROC has used (its threads included)."""
    with open(f"/proc/{proc.pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


# Two rounds, the daemons alternating, best time each: the first stream
# of a fresh chain also pays for reading it into the page cache.
full, rss, cpu = {}, {}, {}
for _ in range(2):
    for name in daemons:
        proc, q = start(name, name + "-full")
        t = time.monotonic()
        q.execute("block-stream", {"job-id": "j", "device": "top"})
        q.event("BLOCK_JOB_COMPLETED", timeout=3600)
        full[name] = min(full.get(name, 1e9), time.monotonic() - t)
        rss[name] = max(rss.get(name, 0), peak_rss_mib(proc))
        cpu[name] = min(cpu.get(name, 1e9), cpu_s(proc))
        stop(proc, q)
        os.unlink(f"top-{name}-full.qcow2")
for name in daemons:
    print(f"{name:8s} unlimited: {full[name]:7.2f} s  "
          f"({size / MIB / full[name]:7.1f} MiB/s)  CPU {cpu[name]:6.2f} s  "
          f"peak RSS {rss[name]:6.1f} MiB")
print(f"ratio stratad/qsd time: {full['stratad'] / full['qsd']:.2f}  "
      f"CPU: {cpu['stratad'] / cpu['qsd']:.2f}  "
      f"peak RSS: {rss['stratad'] / rss['qsd']:.2f}")

# Post-copy: the top's backing file is the base served by qemu-nbd (the
# same neutral server for both daemons), as in the README's recipe.
nbd_sock = os.path.abspath("base-nbd.sock")
server = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "8", "-f", "qcow2",
                           "-k", nbd_sock, "base.qcow2"])
while not os.path.exists(nbd_sock):
    time.sleep(0.02)
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                f"nbd+unix:///?socket={nbd_sock}", "-F", "raw",
                "top-nbd.qcow2", str(size)], check=True)
post = {}
for name in daemons:
    proc, q = start(name, name + "-pc", "top-nbd.qcow2")
    t = time.monotonic()
    q.execute("block-stream", {"job-id": "j", "device": "top"})
    q.event("BLOCK_JOB_COMPLETED", timeout=3600)
    post[name] = time.monotonic() - t
    stop(proc, q)
    os.unlink(f"top-{name}-pc.qcow2")
    print(f"{name:8s} post-copy (base over NBD): {post[name]:7.2f} s  "
          f"({size / MIB / post[name]:7.1f} MiB/s)")
server.terminate()
server.wait()
print(f"ratio stratad/qsd time, post-copy: "
      f"{post['stratad'] / post['qsd']:.2f}")
if os.environ["SHAPE"] != "quarter":
    sys.exit(0)


def fio_p99(sock, secs=8):
    out = subprocess.run(
        ["fio", "--name=g", "--ioengine=nbd",
         f"--uri=nbd+unix:///top?socket={os.path.abspath(sock)}",
         "--rw=randread", "--bs=4k", "--iodepth=1", "--time_based",
         f"--runtime={secs}", f"--size={size}", "--output-format=json"],
        capture_output=True, text=True).stdout
    import json
    j = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return j["clat_ns"]["percentile"]["99.000000"] / 1000, j["iops"]


print("guest 4 KiB randread over NBD (iodepth 1):")
for name, mode in (("qsd", "no job"), ("stratad", "no job"),
                   ("qsd", "stream"), ("stratad", "stream"),
                   ("stratad", "stream, x-yield-to-guest")):
    proc, q = start(name, name + "-lat")
    sock = f"{name}-lat-nbd.sock"
    q.execute("nbd-server-start", {"addr": {"type": "unix",
                                            "data": {"path": sock}}})
    q.execute("block-export-add", {"type": "nbd", "id": "e",
                                   "node-name": "top"})
    if mode != "no job":
        args = {"job-id": "j", "device": "top"}
        if "yield" in mode:
            args.update({"x-yield-to-guest": True,
                         "x-guest-floor-speed": 8 * MIB})
        q.execute("block-stream", args)
    p99, iops = fio_p99(sock)
    rss = peak_rss_mib(proc)
    if mode != "no job" and q.execute("query-block-jobs"):
        q.execute("block-job-cancel", {"device": "j"})
        q.event("BLOCK_JOB_CANCELLED", timeout=60)
    stop(proc, q)
    os.unlink(f"top-{name}-lat.qcow2")
    print(f"  {name:8s} {mode:26s} p99 {p99:8.0f} us  {iops:7.0f} IOPS  "
          f"peak RSS {rss:6.1f} MiB")

need = (2 + 2 * window) * 100 * MIB
if size < need:
    print(f"rate limit: skipped (needs at least {need // MIB} MiB)")
else:
    for name in daemons:
        proc, q = start(name, name + "-rate")
        q.execute("block-stream", {"job-id": "j", "device": "top",
                                   "speed": 100 * MIB})
        r100 = rate_over(q)
        q.execute("block-job-set-speed", {"device": "j", "speed": 50 * MIB})
        r50 = rate_over(q)
        q.execute("block-job-cancel", {"device": "j"})
        q.event("BLOCK_JOB_CANCELLED", timeout=60)
        stop(proc, q)
        os.unlink(f"top-{name}-rate.qcow2")
        print(f"{name:8s} set 100 MiB/s: {r100:6.2f} MiB/s "
              f"({(r100 - 100) / 100 * 100:+.2f} %);  set 50 MiB/s: "
              f"{r50:6.2f} MiB/s ({(r50 - 50) / 50 * 100:+.2f} %)")
EOF

if [[ $shape == quarter ]]; then
  t0=$(date +%s.%N)
  dd if=base.qcow2 of=copy.raw bs=4M conv=fsync status=none
  t1=$(date +%s.%N)
  python3 -c "import sys; t=$t1-$t0; print(f'plain copy (dd, fsync): {t:7.2f} s  ({$mib / t:7.1f} MiB/s)')"
fi
cd /
rm -rf "$work"
work=
done
done
