"""A mirror whose NBD target's server dies mid-job (kill -9): the job
stops or fails as on-target-error says, and the source keeps serving the
guest.

- As qemu-storage-daemon: the same transcript on both daemons, with a
  qemu-nbd target killed once the job runs, for report (the job fails
  with EIO) and stop (paused with io-status failed, paused again after a
  resume, then cancelled).
- Under a guest's writes (the pre-copy half of a migration, the target
  a second stratad killed -9): for report, stop and ignore, and for
  write-blocking, the guest's writes never fail, and afterwards the
  source export reads as the writer's model, the source image checks
  clean and equals the model, and the target node can be deleted.
- ignore retries a dead target with a backoff: a bounded number of
  BLOCK_JOB_ERROR events, not thousands a second (qsd 7.2 stops
  answering QMP in that state, so there is no transcript to compare).
"""
import random
import signal
import time
from pathlib import Path

import pytest

from harness import procs, run
from harness.qcow2 import MiB
from harness.wait import wait_until
from test_commit_active import (SIZE_MIB, Writer, assert_export_reads,
                                scattered_chain, serve_target, serve_top)
from test_job_parity import parity


def qemu_nbd_target(where):
    """A 4 MiB qcow2 served by qemu-nbd on a unix socket in WHERE."""
    img, sock = where / "t.qcow2", where / "t.sock"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    srv = procs.spawn(["qemu-nbd", "-f", "qcow2", "-k", sock, "-x", "t",
                       img])
    procs.wait_for_path(sock)
    return srv, sock


@pytest.mark.parametrize("policy", ["report", "stop"])
def test_target_dies_as_qsd(tmp_path, policy):
    def scenario(r):
        srv, sock = qemu_nbd_target(Path(r.p["top"]).parent)
        r.chain()
        r.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
              server={"type": "unix", "path": str(sock)}, export="t")
        # 1 byte/s: the first piece goes, the next waits for the limit.
        r.cmd("blockdev-mirror", **{"job-id": "m", "device": "top",
                                    "target": "tgt", "sync": "full",
                                    "speed": 1, "on-target-error": policy})
        # Killed once the first piece is copied, while the job waits.
        wait_until(lambda: r.d.ok("query-block-jobs")[0]["offset"] > 0,
                   timeout=30)
        srv.send_signal(signal.SIGKILL)
        srv.wait()
        r.cmd("block-job-set-speed", device="m", speed=0)
        if policy == "stop":
            r.wait("JOB_STATUS_CHANGE", status="paused")
            r.cmd("query-block-jobs")
            r.cmd("block-job-resume", device="m")
            r.wait("JOB_STATUS_CHANGE", status="paused")
            r.cmd("query-block-jobs")
            r.cmd("block-job-cancel", device="m", force=True)
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-block-jobs")
        r.cmd("blockdev-del", **{"node-name": "tgt"})
        # QEMU sends one BLOCK_JOB_ERROR for each copy in flight when the
        # server died, however many that was: compare runs of them as one.
        r.log[:] = [x for i, x in enumerate(r.log)
                    if not (i and x[0] == "BLOCK_JOB_ERROR" == r.log[i - 1][0]
                            and x == r.log[i - 1])]

    log = parity(tmp_path, scenario, mask=True)
    want = "BLOCK_JOB_CANCELLED" if policy == "stop" else "BLOCK_JOB_COMPLETED"
    assert [x[0] for x in log].count("BLOCK_JOB_ERROR") == (
        2 if policy == "stop" else 1), log
    assert any(x[0] == want for x in log)


def count_events(d, name):
    n = sum(1 for e in d.qmp.events if e["event"] == name)
    d.qmp.events = [e for e in d.qmp.events if e["event"] != name]
    return n


@pytest.mark.parametrize("policy,mode", [
    ("report", "background"), ("stop", "background"),
    ("ignore", "background"), ("report", "write-blocking")])
def test_target_dies_under_writes(tmp_path, qemu_img, qemu_io, policy, mode):
    rng = random.Random(3)
    p, raw, model = scattered_chain(tmp_path / "src", qemu_img, qemu_io, rng,
                                    SIZE_MIB * 2)
    dst = tmp_path / "dst.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", dst, f"{SIZE_MIB}M")
    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    b = serve_target(tmp_path / "dst", dst, d)

    w = Writer(f"nbd+unix:///top?socket={sock}", model, 3)
    w.start()
    d.ok("blockdev-mirror", **{"job-id": "m", "device": "top",
                               "target": "tgt", "sync": "full",
                               "copy-mode": mode, "speed": 4 * MiB,
                               "on-target-error": policy})
    job = wait_until(lambda: [j for j in d.ok("query-block-jobs")
                              if j["offset"] > 0], timeout=30)[0]
    assert job["offset"] < job["len"] and not job["ready"], job
    b.kill()                                   # the target host is gone
    before = w.count

    if policy == "report":
        e = d.event("BLOCK_JOB_COMPLETED", timeout=30)
        assert e["data"]["error"] == "Input/output error", e
    elif policy == "stop":
        d.event("BLOCK_JOB_ERROR", timeout=30, action="stop")
        d.event("JOB_STATUS_CHANGE", timeout=30, status="paused")
        [job] = d.ok("query-block-jobs")
        assert job["io-status"] == "failed" and job["paused"], job
    else:
        d.event("BLOCK_JOB_ERROR", timeout=30, action="ignore")
        time.sleep(3)
        n = count_events(d, "BLOCK_JOB_ERROR")
        # 3 free retries, then 10 ms doubling to 1 s: about a dozen in
        # 3 s.  Without the backoff it is thousands.
        assert n <= 30, f"{n} BLOCK_JOB_ERROR events in 3 s"
        [job] = d.ok("query-block-jobs")
        assert job["status"] == "running", job
    if policy != "report":
        d.ok("block-job-cancel", device="m", force=True)
        d.event("BLOCK_JOB_CANCELLED", timeout=30)
    d.event("JOB_STATUS_CHANGE", timeout=30, status="null")

    # The guest goes on writing to the source.
    wait_until(lambda: w.count > before + 10 or w.error, timeout=30)
    w.finish()
    assert d.ok("query-block-jobs") == []
    d.ok("blockdev-del", **{"node-name": "tgt"})
    assert_export_reads(sock, model)
    assert d.stop() == 0
    raw.write_bytes(model)
    run(qemu_img, "check", p["top"])
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, p["top"])
