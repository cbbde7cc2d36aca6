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
# Per row: seconds for each daemon, strata's ratio (below 1: faster), each
# daemon's CPU seconds (user + system) and peak RSS (VmHWM).  Not a test:
# noisy on a shared machine, compare ratios from one run.
#   bench/job-bench.sh [BUILD_DIR]
#   JOB_BENCH_SIZE=1G (default 4G)   BENCH_ROOT=DIR (one root)
set -euo pipefail

# shellcheck source=bench/fixture.sh
. "$(dirname "$0")/fixture.sh"
bench_tools "${1:-}"
size=${JOB_BENCH_SIZE:-4G}
work=
trap '[[ -z $work ]] || rm -rf "$work"' EXIT

printf '%-10s %-15s %9s %9s %6s %14s %14s\n' root row "qsd s" "strata s" \
  ratio "CPU s q/s" "RSS MiB q/s"
for root in $(bench_roots); do
  work=$(mktemp -d "$root/strata-job-bench.XXXXXX")
  make_fixture "$work" fragmented "$size"
  STRATAD=$build/stratad QMP_PY=$top/tests/integration WORK=$work \
    ROOT=$root SIZE=$size /usr/bin/python3 - <<'PY'
import json, os, shutil, subprocess, sys, time
sys.path.insert(0, os.environ["QMP_PY"])
from harness.qmp import QMP

work, root = os.environ["WORK"], os.environ["ROOT"]
stratad = os.environ["STRATAD"]
qsd = shutil.which("qemu-storage-daemon")


def proc_stats(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        hwm = [l for l in f if l.startswith("VmHWM")][0].split()[1]
    return cpu, int(hwm) / 1024


def daemon(kind, d):
    sock = os.path.join(d, f"{kind}.qmp")
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


def run_row(kind, row):
    d = os.path.join(work, f"run-{kind}")
    os.makedirs(d)
    try:
        chain = {n: os.path.join(work, f"{n}.qcow2")
                 for n in ("base", "mid", "top")}
        if row.startswith("commit"):
            # The job writes base: a copy of it, under copies of the rest.
            for n in chain:
                subprocess.run(["cp", "--sparse=always", chain[n],
                                os.path.join(d, f"{n}.qcow2")], check=True)
                chain[n] = os.path.join(d, f"{n}.qcow2")
        p, q = daemon(kind, d)
        add(q, "base", chain["base"])
        add(q, "mid", chain["mid"], "base")
        add(q, "top", chain["top"], "mid")
        virt = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", chain["top"]],
            capture_output=True, check=True).stdout)["virtual-size"]
        if row.startswith("mirror"):
            tgt = os.path.join(d, "tgt.qcow2")
            back = ["-b", chain["mid"], "-F", "qcow2"] if row == "mirror-top" else []
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *back,
                            tgt, str(virt)], check=True)
            add(q, "tgt", tgt, "mid" if back else None)
        t0 = time.monotonic()
        if row == "commit-mid":
            q.execute("block-commit", {"job-id": "j", "device": "top",
                                       "top-node": "mid"})
        elif row == "commit-active":
            q.execute("block-commit", {"job-id": "j", "device": "top"})
        else:
            q.execute("blockdev-mirror", {"job-id": "j", "device": "top",
                                          "target": "tgt",
                                          "sync": row.split("-")[1]})
        times = []
        if row != "commit-mid":
            q.event("BLOCK_JOB_READY", timeout=3600)
            times.append(time.monotonic() - t0)
            q.execute("block-job-complete", {"device": "j"})
        e = q.event("BLOCK_JOB_COMPLETED", timeout=3600)
        times.append(time.monotonic() - t0)
        assert "error" not in e["data"], e
        cpu, rss = proc_stats(p.pid)
        q.execute("quit")
        p.wait(60)
        return times, cpu, rss
    finally:
        shutil.rmtree(d, ignore_errors=True)


for row in ("commit-mid", "commit-active", "mirror-full", "mirror-top"):
    (tq, cq, rq), (ts, cs, rs) = run_row("qsd", row), run_row("stratad", row)
    for i, what in enumerate([" ready", " done"] if len(tq) > 1 else [""]):
        print(f"{root:10s} {row + what:15s} {tq[i]:9.2f} {ts[i]:9.2f} "
              f"{ts[i] / tq[i]:6.2f} {cq:6.2f}/{cs:<6.2f} "
              f"{rq:6.1f}/{rs:<6.1f}", flush=True)
PY
  rm -rf "$work"
  work=
done
