"""blockdev-mirror in stratad against qemu-storage-daemon 7.2: the same
commands on both daemons over fresh copies of the same chain (base <- mid
<- top, see test_job_parity.py) and the same empty targets, the whole
transcripts compared (replies, error classes and texts, events in order)
and every image compared with qemu-img info, check and map (what the guest
sees where; QEMU's parallel copies allocate the target's clusters in no
set order) afterwards."""
import subprocess

import pytest
from pathlib import Path

from test_commit_parity import export_top
from test_job_parity import SLOW, errors, events, parity, qsd  # noqa: F401

TARGETS = (("t1", "4M"), ("t2", "8M"), ("t3", "4M"), ("t4", "4M"))


def targets(p):
    """Empty qcow2 targets beside the chain (t2 the wrong size)."""
    d = Path(p["top"]).parent
    for name, size in TARGETS:
        p[name] = str(d / f"{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p[name],
                        size], check=True)


def add_targets(r):
    for name, _ in TARGETS:
        r.cmd("blockdev-add", driver="qcow2", **{"node-name": name},
              file={"driver": "file", "filename": r.p[name]})


def test_blockdev_mirror_errors_in_qsd_order(tmp_path):
    def scenario(r):
        r.chain()
        add_targets(r)
        for a in [
            {"device": "nope", "target": "nope2", "sync": "full"},
            {"device": "top", "target": "nope", "sync": "full"},
            {"device": "mid", "target": "t1", "sync": "full"},
            {"device": "top", "target": "top", "sync": "full",
             "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full",
             "granularity": 1000, "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full",
             "granularity": 256, "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full",
             "granularity": 1 << 27, "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full",
             "buf-size": -1, "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "incremental",
             "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "bogus",
             "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full",
             "on-target-error": "bogus", "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full"},
            {"device": "top", "target": "mid", "sync": "full",
             "job-id": "m"},
            {"device": "top", "target": "t1", "sync": "full",
             "replaces": "nope", "job-id": "m"},
        ]:
            r.cmd("blockdev-mirror", **a)
        r.cmd("blockdev-mirror", **{"device": "top", "target": "t1",
                                    "sync": "full", "job-id": "m",
                                    "speed": -1})
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, setup=targets, host_offsets=False)
    errs = errors(log)
    assert errs[:3] == ["Cannot find device='nope' nor node-name='nope'",
                        "Cannot find device='nope' nor node-name='nope'",
                        "Need a root block node"]
    assert "Can't mirror node into itself" in errs
    assert "Node 'mid' is busy: node is used as backing hd of 'top'" in errs


def test_blockdev_mirror_pivots_as_qsd(tmp_path):
    """A target of another size fails the job; a full mirror of top goes
    READY and complete moves the export onto the target; mirrors of the
    target with sync none and top (= full: no backing) cancelled after
    READY complete without a pivot."""
    def scenario(r):
        r.chain()
        add_targets(r)
        export_top(r)
        r.cmd("blockdev-mirror", **{"device": "top", "target": "t2",
                                    "sync": "full", "job-id": "m2"})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("blockdev-mirror", **{"device": "top", "target": "t1",
                                    "sync": "full", "job-id": "m"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("query-block-jobs")
        r.cmd("block-job-complete", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-block-exports")
        r.cmd("blockdev-del", **{"node-name": "t1"})
        for sync, tgt in (("none", "t3"), ("top", "t4")):
            r.cmd("blockdev-mirror", **{"device": "t1", "target": tgt,
                                        "sync": sync, "job-id": "n"})
            r.wait("BLOCK_JOB_READY")
            r.cmd("block-job-cancel", device="n")
            r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, setup=targets, host_offsets=False)
    assert events(log).count("BLOCK_JOB_READY") == 3
    assert errors(log) == ["Node t1 is in use"]


def test_blockdev_mirror_sync_top_and_held_nodes_as_qsd(tmp_path):
    """sync=top copies only what top holds (the target then needs top's
    backing to read right); while a slow mirror runs its nodes are held as
    QEMU holds them; a forced cancel stops it."""
    def scenario(r):
        r.chain()
        add_targets(r)
        r.cmd("blockdev-mirror", **{"device": "top", "target": "t1",
                                    "sync": "top", "job-id": "m"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-cancel", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("blockdev-mirror", **{"device": "top", "target": "t3",
                                    "sync": "full", "job-id": "m",
                                    "speed": SLOW})
        for n in ("top", "t3"):
            r.cmd("blockdev-del", **{"node-name": n})
        r.cmd("blockdev-mirror", **{"device": "top", "target": "t4",
                                    "sync": "full", "job-id": "m2"})
        r.cmd("blockdev-mirror", **{"device": "t4", "target": "t3",
                                    "sync": "full", "job-id": "m2"})
        r.cmd("block-commit", **{"device": "top", "job-id": "c"})
        r.cmd("block-job-cancel", device="m", force=True)
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, mask=True, setup=targets,
                 host_offsets=False)
    assert "BLOCK_JOB_CANCELLED" in events(log)


@pytest.mark.parametrize("mode,errno", [("stop", 5), ("report", 5),
                                        ("enospc", 28), ("ignore", 5)])
def test_mirror_target_errors_as_qsd(tmp_path, mode, errno):
    """A target whose first write fails once (blkdebug): on-target-error
    decides, BLOCK_JOB_ERROR says write; stop pauses until resumed, report
    fails the job, ignore goes on; the mirror that goes on reaches READY
    and is cancelled softly."""
    def scenario(r):
        r.chain()
        r.cmd("blockdev-add", **{
            "driver": "qcow2", "node-name": "t1",
            "file": {"driver": "blkdebug", "node-name": "dbg",
                     "image": {"driver": "file", "filename": r.p["t1"]},
                     "inject-error": [{"event": "write_aio",
                                       "errno": errno, "once": True}]}})
        r.cmd("blockdev-mirror", **{"job-id": "m", "device": "top",
                                    "target": "t1", "sync": "full",
                                    "on-target-error": mode})
        if mode in ("stop", "enospc"):
            r.wait("JOB_STATUS_CHANGE", status="paused")
            r.cmd("query-block-jobs")
            r.cmd("block-job-resume", device="m")
        if mode != "report":
            r.wait("BLOCK_JOB_READY")
            r.cmd("block-job-cancel", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, mask=True, setup=targets,
                 host_offsets=False)
    assert "BLOCK_JOB_ERROR" in events(log)
