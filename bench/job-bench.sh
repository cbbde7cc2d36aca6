#!/usr/bin/env bash
# block-commit and blockdev-mirror in stratad against qemu-storage-daemon
# on bench/fixture.sh's fragmented chain (base fully written, mid and top
# each holding 10 % in scattered 64 KiB clusters), on tmpfs and on the
# disk (bench_roots).  Rows, each daemon on fresh copies of what the job
# writes, no speed limit, warm caches:
#   commit-mid       intermediate commit of mid into base (device top):
#                    block-commit to BLOCK_JOB_COMPLETED
#   commit-active    active commit of top (and mid) into base: to
#                    BLOCK_JOB_READY, and to COMPLETED after
#                    block-job-complete (the pivot)
#   mirror-full      blockdev-mirror sync=full to an empty qcow2 of the
#                    same size: to READY, and to COMPLETED after complete
#   mirror-top       blockdev-mirror sync=top to an empty qcow2 over mid
#   mirror-nbd       sync=full to an NBD target: a second daemon of the
#                    same kind serving an empty qcow2 over NBD (Unix socket)
#   conv-background  convergence: fio writes 4 KiB at random places at a
#   conv-blocking    fixed rate (JOB_BENCH_IOPS, default 1000) on an NBD
#                    export of the source while a sync=full mirror runs,
#                    copy-mode background or write-blocking: seconds to
#                    READY (then completed)
# Per row: seconds for each daemon (its fastest of JOB_BENCH_REPS runs), strata's ratio (below 1: faster), each
# daemon's CPU seconds (user + system) and peak RSS (VmHWM; the source
# daemon's in the NBD rows).  Then, per root, the guest's p99 write
# latency (fio, per-I/O log) in the convergence rows: before the job (no
# job) and from the job's start to READY, in microseconds.  Not a test:
# noisy on a shared machine, compare ratios from one run.
#   bench/job-bench.sh [BUILD_DIR]
#   JOB_BENCH_SIZE=1G (default 4G)   BENCH_ROOT=DIR (one root)
#   JOB_BENCH_ROWS="mirror-full conv-blocking" (default all)
#   JOB_BENCH_REPS=3 (default 1: each daemon's fastest run of each row)
set -euo pipefail

# shellcheck source=bench/fixture.sh
. "$(dirname "$0")/fixture.sh"
bench_tools "${1:-}"
size=${JOB_BENCH_SIZE:-4G}
work=
trap '[[ -z $work ]] || rm -rf "$work"' EXIT

printf '%-10s %-21s %8s %9s %6s %13s %13s\n' root row "qsd s" "strata s" \
  ratio "CPU s q/s" "RSS MiB q/s"
for root in $(bench_roots); do
  work=$(mktemp -d "$root/strata-job-bench.XXXXXX")
  make_fixture "$work" fragmented "$size"
  STRATAD=$build/stratad QMP_PY=$top/tests/integration WORK=$work \
    ROOT=$root /usr/bin/python3 - <<'PY'
import json, os, shutil, signal, subprocess, sys, time
sys.path.insert(0, os.environ["QMP_PY"])
from harness.qmp import QMP

work, root = os.environ["WORK"], os.environ["ROOT"]
stratad = os.environ["STRATAD"]
qsd = shutil.which("qemu-storage-daemon")
iops = int(os.environ.get("JOB_BENCH_IOPS", "1000"))
reps = int(os.environ.get("JOB_BENCH_REPS", "1"))
ROWS = ("commit-mid", "commit-active", "mirror-full", "mirror-top",
        "mirror-nbd", "conv-background", "conv-blocking")
rows = os.environ.get("JOB_BENCH_ROWS", "").split() or ROWS


def proc_stats(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        hwm = [l for l in f if l.startswith("VmHWM")][0].split()[1]
    return cpu, int(hwm) / 1024


def daemon(kind, d, name):
    sock = os.path.join(d, f"{name}.qmp")
    if kind == "qsd":
        argv = [qsd, "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                "--monitor", "chardev=m"]
    else:
        argv = [stratad, "--qmp", sock]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return p, QMP(sock, timeout=3600)


def add(q, name, path, backing=None):
    args = {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": path}}
    if backing is not None:
        args["backing"] = backing
    q.execute("blockdev-add", args)


def export(q, node, sock):
    q.execute("nbd-server-start", {"addr": {"type": "unix",
                                            "data": {"path": sock}}})
    q.execute("block-export-add", {"type": "nbd", "id": node,
                                   "node-name": node, "writable": True})


def start_fio(d, sock):
    """fio at IOPS 4 KiB random writes on the export of top, logging each
    write's latency with its wall-clock time (stopped by SIGINT)."""
    log = os.path.join(d, "fio")
    p = subprocess.Popen(
        ["fio", "--name=guest", "--ioengine=nbd",
         f"--uri=nbd+unix:///top?socket={sock}", "--rw=randwrite",
         "--bs=4k", "--iodepth=1", f"--rate_iops={iops}", "--time_based",
         "--runtime=3600", f"--write_lat_log={log}", "--log_avg_msec=0",
         "--log_unix_epoch=1", "--randseed=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, log + "_lat.1.log"


def p99_us(logf, t0, t1):
    """p99 of the write latencies logged between wall times T0 and T1."""
    lat = []
    with open(logf) as f:
        for line in f:
            t, v = line.split(",")[:2]
            if t0 * 1000 <= int(t) <= t1 * 1000:
                lat.append(int(v))
    lat.sort()
    return lat[min(len(lat) - 1, len(lat) * 99 // 100)] / 1000 if lat else 0


def run_row(kind, row):
    d = os.path.join(work, f"run-{kind}")
    os.makedirs(d)
    procs, lat = [], None
    try:
        chain = {n: os.path.join(work, f"{n}.qcow2")
                 for n in ("base", "mid", "top")}
        if row.startswith("commit") or row.startswith("conv"):
            # The job (or the guest) writes them: copies.
            for n in chain:
                subprocess.run(["cp", "--sparse=always", chain[n],
                                os.path.join(d, f"{n}.qcow2")], check=True)
                chain[n] = os.path.join(d, f"{n}.qcow2")
        p, q = daemon(kind, d, "src")
        procs.append(p)
        add(q, "base", chain["base"])
        add(q, "mid", chain["mid"], "base")
        add(q, "top", chain["top"], "mid")
        virt = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", chain["top"]],
            capture_output=True, check=True).stdout)["virtual-size"]
        if row.startswith("mirror") or row.startswith("conv"):
            tgt = os.path.join(d, "tgt.qcow2")
            back = ["-b", chain["mid"], "-F", "qcow2"] if row == "mirror-top" else []
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *back,
                            tgt, str(virt)], check=True)
            if row == "mirror-nbd":
                tp, tq = daemon(kind, d, "tgt")
                procs.append(tp)
                add(tq, "dst", tgt)
                export(tq, "dst", os.path.join(d, "tgt.nbd"))
                q.execute("blockdev-add", {
                    "driver": "nbd", "node-name": "tgt", "export": "dst",
                    "server": {"type": "unix",
                               "path": os.path.join(d, "tgt.nbd")}})
            else:
                add(q, "tgt", tgt, "mid" if back else None)
        if row.startswith("conv"):
            export(q, "top", os.path.join(d, "src.nbd"))
            fio, logf = start_fio(d, os.path.join(d, "src.nbd"))
            procs.append(fio)
            time.sleep(3)  # the guest alone: the no-job latency
            w0 = time.time()
        t0 = time.monotonic()
        if row == "commit-mid":
            q.execute("block-commit", {"job-id": "j", "device": "top",
                                       "top-node": "mid"})
        elif row == "commit-active":
            q.execute("block-commit", {"job-id": "j", "device": "top"})
        else:
            args = {"job-id": "j", "device": "top", "target": "tgt",
                    "sync": "top" if row == "mirror-top" else "full"}
            if row == "conv-blocking":
                args["copy-mode"] = "write-blocking"
            q.execute("blockdev-mirror", args)
        times = []
        if row != "commit-mid":
            q.event("BLOCK_JOB_READY", timeout=3600)
            times.append(time.monotonic() - t0)
            w1 = time.time()
            q.execute("block-job-complete", {"device": "j"})
        e = q.event("BLOCK_JOB_COMPLETED", timeout=3600)
        times.append(time.monotonic() - t0)
        assert "error" not in e["data"], e
        cpu, rss = proc_stats(p.pid)
        if row.startswith("conv"):
            fio.send_signal(signal.SIGINT)
            fio.wait(60)
            lat = (p99_us(logf, w0 - 2, w0), p99_us(logf, w0, w1))
        for pq in [q] + ([tq] if row == "mirror-nbd" else []):
            pq.execute("quit")
        for pr in procs:
            pr.wait(60)
        return times, cpu, rss, lat
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
        shutil.rmtree(d, ignore_errors=True)


p99 = []
for row in rows:
    # Each daemon's fastest of REPS runs, the two alternating (so a burst
    # of load from elsewhere hits both).
    best = {}
    for _ in range(reps):
        for kind in ("qsd", "stratad"):
            r = run_row(kind, row)
            if kind not in best or r[0][-1] < best[kind][0][-1]:
                best[kind] = r
    (tq, cq, rq, lq), (ts, cs, rs, ls) = best["qsd"], best["stratad"]
    if lq:
        p99.append((row, lq, ls))
    for i, what in enumerate([" ready", " done"] if len(tq) > 1 else [""]):
        print(f"{root:10s} {row + what:21s} {tq[i]:8.2f} {ts[i]:9.2f} "
              f"{ts[i] / tq[i]:6.2f} {cq:6.2f}/{cs:<6.2f} "
              f"{rq:6.1f}/{rs:<6.1f}", flush=True)
if p99:
    print(f"{'':10s} guest p99 write latency, us, fio {iops} IOPS 4 KiB "
          "random: qsd / strata")
    for row, lq, ls in p99:
        print(f"{root:10s} {row + ' no job':21s} {lq[0]:8.0f} {ls[0]:9.0f} "
              f"{ls[0] / max(lq[0], 1):6.2f}")
        print(f"{root:10s} {row + ' job':21s} {lq[1]:8.0f} {ls[1]:9.0f} "
              f"{ls[1] / max(lq[1], 1):6.2f}", flush=True)
PY
  rm -rf "$work"
  work=
done
