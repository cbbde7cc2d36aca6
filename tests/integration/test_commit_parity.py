"""block-commit in stratad against qemu-storage-daemon 7.2: the same QMP
commands on both daemons over fresh copies of the same chain (base <- mid
<- top, see test_job_parity.py), the whole transcripts compared (replies
with their error classes and texts, events in order) and the images left
behind compared with qemu-img info, check and map.

Intermediate commit (top below the device's active layer) only: active
commit is not built yet (stratad refuses it with a message saying so, a
case these tests leave out).
"""
from pathlib import Path

import pytest

from test_job_parity import SLOW, errors, events, parity, qsd  # noqa: F401


@pytest.mark.parametrize("args", [
    {"top-node": "mid"},
    {"top-node": "mid", "base-node": "base"},
    {"top-node": "mid", "backing-file": "renamed.qcow2"},
    {"top-node": "mid", "auto-dismiss": False},
    {"top-node": "mid", "speed": 1 << 30, "on-error": "stop"},
], ids=["top-node", "base-node", "backing-file", "no-dismiss", "speed-stop"])
def test_intermediate_commit_completes_as_qsd(tmp_path, args):
    def scenario(r):
        r.chain()
        r.cmd("block-commit", **{"job-id": "j1", "device": "top", **args})
        if args.get("auto-dismiss") is False:
            r.wait("JOB_STATUS_CHANGE", status="concluded")
            r.cmd("query-block-jobs")
            r.cmd("query-jobs")
            r.cmd("job-dismiss", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-jobs")
        # The chain as it is now: a second commit finds base under top.
        r.cmd("block-commit", **{"job-id": "j2", "device": "top",
                                 "top-node": "mid"})

    log = parity(tmp_path, scenario)
    assert events(log)[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert ["commit"] == [x[1]["type"] for x in log
                          if x[0] == "BLOCK_JOB_COMPLETED"]


def test_commit_by_file_names_as_qsd(tmp_path):
    """top and base named by file name, as the layer above records it or
    as an absolute path; a name the chain does not hold."""
    def scenario(r):
        r.chain()
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top": "nofile.qcow2"})
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top": r.p["mid"], "base": "nofile.qcow2"})
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top": r.p["mid"], "base": r.p["base"]})
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario)
    assert errors(log) == ["Top image file nofile.qcow2 not found",
                           "Can't find 'nofile.qcow2' in the backing chain"]


def test_block_commit_errors_in_qsd_order(tmp_path):
    """Each refusal, and which check wins when several apply: the device
    (DeviceNotFound, a root node) before top, top before base, a missing
    job-id is '' (no BlockBackend), a bad speed after the job was
    created (created, null)."""
    def scenario(r):
        r.chain()
        for a in [
            {"device": "nonode", "top": "x", "top-node": "y"},
            {"device": "mid", "top-node": "base"},
            {"device": "top", "top": "x", "top-node": "mid"},
            {"device": "top", "top-node": "nonode"},
            {"device": "top", "top-node": "mid", "base": "x",
             "base-node": "base"},
            {"device": "top", "top-node": "mid", "base-node": "nonode"},
            {"device": "top", "top-node": "mid", "base-node": "top"},
            {"device": "top", "top-node": "mid", "base-node": "mid"},
            {"device": "top", "top-node": "base"},
            {"device": "top", "top-node": "mid"},
            {"job-id": "", "device": "top", "top-node": "mid"},
            {"job-id": "1bad", "device": "top", "top-node": "mid"},
            {"job-id": "j1", "device": "top", "top-node": "mid",
             "on-error": "nope"},
            {"job-id": "j1", "device": "top", "top-node": "mid",
             "speed": "fast"},
            {"job-id": "j1", "device": "top", "backing-file": "x"},
        ]:
            r.cmd("block-commit", **a)
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top-node": "mid", "speed": -1})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-jobs")

    log = parity(tmp_path, scenario)
    errs = errors(log)
    assert errs[0] == "Device 'nonode' not found"
    assert "Need a root block node" in errs
    assert "cannot commit an image into itself" in errs
    assert errs.count("Invalid job ID ''") == 2
    assert events(log) == ["created", "null"]


def test_commit_nodes_held_and_cancel_as_qsd(tmp_path):
    """While a slow commit runs: blockdev-del of each node, a second
    commit or a stream over its nodes are refused as QEMU refuses them;
    pause, set-speed, resume, then cancel (BLOCK_JOB_CANCELLED) frees
    everything and leaves the chain as it was."""
    def scenario(r):
        r.chain()
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top-node": "mid", "speed": SLOW})
        for n in ("top", "mid", "base"):
            r.cmd("blockdev-del", **{"node-name": n})
        r.cmd("block-commit", **{"job-id": "j2", "device": "top",
                                 "top-node": "mid"})
        r.cmd("block-stream", **{"job-id": "j2", "device": "top"})
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top-node": "mid"})
        r.cmd("block-job-pause", device="j1")
        r.wait("JOB_STATUS_CHANGE", status="paused")
        r.cmd("block-job-set-speed", device="j1", speed=SLOW * 2)
        r.cmd("query-block-jobs")
        r.cmd("block-job-resume", device="j1")
        r.wait("JOB_STATUS_CHANGE", status="running")
        r.cmd("block-job-cancel", device="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-jobs")
        for n in ("top", "mid", "base"):
            r.cmd("blockdev-del", **{"node-name": n})

    log = parity(tmp_path, scenario, mask=True)
    assert "BLOCK_JOB_CANCELLED" in events(log)
    assert any("is busy: block device is in use by block job: commit" in e
               for e in errors(log))


def test_commit_into_read_only_base_as_qsd(tmp_path):
    """A base opened read-only is made writable for the job and read-only
    again after it (a write through it is refused again)."""
    def scenario(r):
        r.add("base", **{"read-only": True})
        r.add("mid", "base")
        r.add("top", "mid")
        r.cmd("block-commit", **{"job-id": "j1", "device": "top",
                                 "top-node": "mid"})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("block-stream", **{"job-id": "j2", "device": "base"})
        r.cmd("nbd-server-start",
              addr={"type": "unix",
                    "data": {"path": str(Path(r.p["top"]).parent / "s")}})
        r.cmd("block-export-add", type="nbd", id="e", **{"node-name": "base"},
              writable=True)

    log = parity(tmp_path, scenario)
    assert len(errors(log)) >= 1


# ---- active commit ----


def export_top(r):
    r.cmd("nbd-server-start",
          addr={"type": "unix",
                "data": {"path": str(Path(r.p["top"]).parent / "n.sock")}})
    r.cmd("block-export-add", type="nbd", id="e", **{"node-name": "top"},
          writable=True)


def test_active_commit_pivots_as_qsd(tmp_path):
    """READY, then complete: the export moves onto the base and the old
    top can be deleted; then active commits of mid cancelled softly after
    READY (completed, no pivot) and with force before and after it."""
    def scenario(r):
        r.chain()
        export_top(r)
        r.cmd("block-commit", **{"job-id": "j", "device": "top",
                                 "base-node": "mid"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-complete", device="j")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-block-exports")
        r.cmd("blockdev-del", **{"node-name": "top"})
        r.cmd("block-commit", **{"job-id": "k", "device": "mid"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-cancel", device="k")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-block-exports")
        r.cmd("block-commit", **{"job-id": "k", "device": "mid",
                                 "speed": 1000})
        r.cmd("block-job-cancel", device="k")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("block-commit", **{"job-id": "k", "device": "mid"})
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-cancel", device="k", force=True)
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario)
    assert events(log).count("BLOCK_JOB_READY") == 3
    assert events(log).count("BLOCK_JOB_CANCELLED") == 2


def test_active_commit_verbs_as_qsd(tmp_path):
    """Before READY complete is refused; READY and paused is standby;
    backing-file is refused for the active layer; with auto-finalize off
    the job waits in pending after complete until job-finalize."""
    def scenario(r):
        r.chain()
        r.cmd("block-commit", **{"job-id": "j", "device": "top",
                                 "backing-file": "x"})
        r.cmd("block-commit", **{"job-id": "j", "device": "top",
                                 "speed": SLOW, "auto-finalize": False,
                                 "auto-dismiss": False})
        r.cmd("block-job-complete", device="j")
        r.cmd("block-job-set-speed", device="j", speed=0)
        r.wait("BLOCK_JOB_READY")
        r.cmd("block-job-pause", device="j")
        r.wait("JOB_STATUS_CHANGE", status="standby")
        r.cmd("query-jobs")
        r.cmd("block-job-resume", device="j")
        r.wait("JOB_STATUS_CHANGE", status="ready")
        r.cmd("block-job-complete", device="j")
        r.wait("BLOCK_JOB_PENDING")
        r.cmd("query-jobs")
        r.cmd("job-finalize", id="j")
        r.wait("JOB_STATUS_CHANGE", status="concluded")
        r.cmd("job-dismiss", id="j")
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, mask=True)
    errs = errors(log)
    assert errs[0] == "'backing-file' specified, but 'top' is the active layer"
    assert "standby" in events(log)
