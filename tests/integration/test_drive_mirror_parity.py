"""drive-mirror in stratad against qemu-storage-daemon 7.2: the same
commands on both daemons over fresh copies of the same chain (base <- mid
<- top, see test_job_parity.py), the whole transcripts compared (replies,
error classes and texts, events in order) and the target files the
command created compared with qemu-img info (format, size, backing name
and format), check and map (what the guest sees where) afterwards.

One departure is asserted rather than compared: QEMU leaves the target
file it created behind when a later check refuses the command; stratad
removes the file it made, so a refusal leaves nothing.
"""
import json
import subprocess
from pathlib import Path

import pytest

from harness import run
from test_commit_parity import export_top
from test_job_parity import errors, events, parity, qsd  # noqa: F401


def targets(*names):
    """A setup adding NAMES (files the scenario's drive-mirror creates) to
    the images compared afterwards."""
    def setup(p):
        d = Path(p["top"]).parent
        for n in names:
            p[n] = str(d / n)
    return setup


def nodes(r):
    """query-named-block-nodes (flat) as the graph it describes: each
    node's name, driver, file and backing names, read-only flag, in
    QEMU's order (not the sizes, which depend on how the copy allocated)."""
    rsp = r.d.cmd("query-named-block-nodes", flat=True)
    r.log.append(("nodes", [(n["node-name"], n["drv"], n["file"],
                             n.get("backing_file"), n["ro"])
                            for n in rsp["return"]]))


def test_drive_mirror_refusals_as_qsd(tmp_path):
    """Each refusal in QEMU's order and text: the arguments, the device,
    replaces without node-name, an unknown format, a file that cannot be
    made or opened (or is locked by the daemon), then the checks after the
    target is open (node-name, granularity, sync, buf-size, job ID,
    speed).  stratad leaves none of the files behind."""
    def scenario(r):
        r.chain()
        d = str(Path(r.p["top"]).parent)
        for a in [
            {"target": d + "/a.qcow2"},
            {"target": d + "/b.qcow2", "job-id": "1bad"},
            {"target": d + "/c.qcow2", "granularity": 1000},
            {"target": d + "/e.qcow2", "replaces": "top"},
            {"target": d + "/f.qcow2", "format": "bogus"},
            {"target": d + "/nodir/g.qcow2"},
            {"target": d + "/h.qcow2", "mode": "existing"},
            {"target": d + "/i.qcow2", "mode": "bogus"},
            {"target": d + "/j.qcow2", "device": "mid"},
            {"target": d + "/k.qcow2", "device": "nope"},
            {"target": d + "/l.qcow2", "node-name": "top"},
            {"target": d + "/l2.qcow2", "node-name": "1bad"},
            {"target": d + "/m.qcow2", "sync": "incremental"},
            {"target": d + "/n.qcow2", "buf-size": -1},
            {"target": d + "/top.qcow2"},
            {"target": d + "/mid.qcow2", "mode": "existing"},
            {"target": d + "/o.qcow2", "filter-node-name": "x"},
            {"target": d + "/p.raw", "format": "raw", "sync": "none"},
            {"target": ""},
        ]:
            a = {"device": "top", "sync": "full", "job-id": "m", **a}
            a = {k: v for k, v in a.items()
                 if not (k == "job-id" and a["target"].endswith("/a.qcow2"))}
            r.cmd("drive-mirror", **a)
        r.cmd("drive-mirror", **{"device": "top", "sync": "full",
                                 "job-id": "m", "speed": -1,
                                 "target": d + "/q.qcow2"})
        r.wait("JOB_STATUS_CHANGE", status="null")
        nodes(r)

    log = parity(tmp_path, scenario)
    errs = errors(log)
    assert errs[:3] == ["Invalid job ID ''", "Invalid job ID '1bad'",
                        "Parameter 'granularity' expects a power of 2"]
    assert "Backing file not supported for file format 'raw'" in errs
    assert 'Failed to get "write" lock' in errs
    left = sorted(f.name for f in (tmp_path / "stratad").iterdir()
                  if f.suffix in (".qcow2", ".raw"))
    assert left == ["base.qcow2", "mid.qcow2", "top.qcow2"]
    assert (tmp_path / "qsd" / "a.qcow2").exists()  # QEMU leaves it


def test_drive_mirror_full_pivots_as_qsd(tmp_path):
    """sync=full into a new file in the source's format (qcow2, no
    backing), READY, complete: the export moves onto the new node; then a
    raw target named by node-name, cancelled after READY."""
    def scenario(r):
        r.chain()
        export_top(r)
        d = str(Path(r.p["top"]).parent)
        r.cmd("drive-mirror", **{"device": "top", "target": d + "/a.qcow2",
                                 "sync": "full", "job-id": "m"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("query-block-jobs")
        r.cmd("block-job-complete", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-block-exports")
        nodes(r)
        r.cmd("block-export-del", id="e")
        r.wait("BLOCK_EXPORT_DELETED")
        r.cmd("drive-mirror", **{"device": "top", "target": d + "/b.raw",
                                 "format": "raw", "sync": "full",
                                 "job-id": "m", "node-name": "tb"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("blockdev-del", **{"node-name": "tb"})
        r.cmd("block-job-cancel", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("blockdev-del", **{"node-name": "tb"})

    log = parity(tmp_path, scenario, setup=targets("a.qcow2", "b.raw"),
                 host_offsets=False)
    assert events(log).count("BLOCK_JOB_READY") == 2


@pytest.mark.parametrize("sync", ["top", "none"])
def test_drive_mirror_shallow_as_qsd(tmp_path, sync):
    """mode=absolute-paths: sync=top makes a target whose backing file is
    the source's backing (mid), sync=none one backed by the source
    itself; each copies only what it must, READY, cancelled softly."""
    def scenario(r):
        r.chain()
        d = str(Path(r.p["top"]).parent)
        r.cmd("drive-mirror", **{"device": "top", "target": d + "/a.qcow2",
                                 "sync": sync, "job-id": "m"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-cancel", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")

    parity(tmp_path, scenario, setup=targets("a.qcow2"), host_offsets=False)
    info = json.loads(run("qemu-img", "info", "--output=json",
                          str(tmp_path / "stratad" / "a.qcow2")).stdout)
    assert info["backing-filename"] == str(
        tmp_path / "stratad" / ("mid.qcow2" if sync == "top" else
                                "top.qcow2"))


def test_drive_mirror_top_pivot_reads_through_mid(tmp_path):
    """After a sync=top pivot the export reads what the guest saw: top's
    data from the new file, the rest through mid, whose node became the
    target's backing (as QEMU sets it at the pivot)."""
    def scenario(r):
        r.chain()
        export_top(r)
        d = str(Path(r.p["top"]).parent)
        r.cmd("drive-mirror", **{"device": "top", "target": d + "/a.qcow2",
                                 "sync": "top", "job-id": "m"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-complete", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")
        sock = str(Path(r.p["top"]).parent / "n.sock")
        out = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "read -P 3 0 64k",
             "-c", "read -P 2 1M 1M", "-c", "read -P 1 2M 2M",
             f"nbd+unix:///top?socket={sock}"],
            capture_output=True, text=True)
        r.log.append(("qemu-io", out.returncode,
                      "Pattern verification failed" in out.stdout))
        nodes(r)

    log = parity(tmp_path, scenario, setup=targets("a.qcow2"),
                 host_offsets=False)
    assert ["qemu-io", 0, False] in log


def test_drive_mirror_existing_as_qsd(tmp_path):
    """mode=existing opens the file that is there (format probed, or as
    given) and creates nothing; a wrong size fails the job."""
    def setup(p):
        d = Path(p["top"]).parent
        for n, size in (("e.qcow2", "4M"), ("w.qcow2", "8M")):
            p[n] = str(d / n)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p[n],
                            size], check=True)

    def scenario(r):
        r.chain()
        export_top(r)
        d = str(Path(r.p["top"]).parent)
        r.cmd("drive-mirror", **{"device": "top", "target": d + "/w.qcow2",
                                 "sync": "full", "mode": "existing",
                                 "job-id": "w"})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("drive-mirror", **{"device": "top", "target": d + "/e.qcow2",
                                 "sync": "full", "mode": "existing",
                                 "format": "qcow2", "node-name": "ex",
                                 "job-id": "m"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-complete", device="m")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-block-exports")

    log = parity(tmp_path, scenario, setup=setup, host_offsets=False)
    assert "Source and target image have different sizes" in json.dumps(log)
