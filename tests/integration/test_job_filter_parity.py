"""The filter nodes QEMU's commit and mirror jobs put in the graph
(mirror_top over the device of a mirror or an active commit, commit_top
over the top of an intermediate commit), against qemu-storage-daemon
7.2: a filter-node-name that clashes or is malformed, and in which order
that check comes; the node listed while the job runs, named or automatic,
in the flat and the nested query-named-block-nodes; blockdev-del and new
jobs on it; its name free again and the node gone after the job.

In strata the filter stands beside the data path (drivers/jobfilter.c):
what these tests leave out because of that is listed in docs/jobs.md.
"""
import subprocess
from pathlib import Path

from test_job_parity import SLOW, errors, events, parity, qsd  # noqa: F401
from test_mirror_parity import add_targets, targets


def setup_images(p):
    """The mirror targets, and f.qcow2, opened by nobody."""
    targets(p)
    p["f"] = str(Path(p["top"]).parent / "f.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p["f"], "4M"],
                   check=True)


def nodes(r, flat=True):
    """query-named-block-nodes without the sizes and the dirty-bitmaps
    (what they count depends on how far the job got)."""
    rsp = r.d.cmd("query-named-block-nodes", flat=flat)
    r.log.append(("nodes", flat, [
        (n["node-name"], n["drv"], n["file"], n.get("backing_file"), n["ro"],
         n["backing_file_depth"], sorted(n["image"]),
         n["image"].get("backing-image", {}).get("filename"))
        for n in rsp["return"]]))


def test_filter_name_clashes_as_qsd(tmp_path):
    """A filter-node-name taken (by a node, the target) or malformed: the
    mirror and the active commit refuse it before the job exists (before
    the job ID and the speed are looked at), the intermediate commit after
    it (created, null)."""
    def scenario(r):
        r.chain()
        add_targets(r)
        for fn, extra in (("top", {}), ("1bad", {}), ("t1", {}),
                          ("top", {"job-id": "1bad"}),
                          ("top", {"speed": -1}),
                          ("top", {"granularity": 1000})):
            r.cmd("blockdev-mirror", **{"job-id": "m", "device": "top",
                                        "target": "t1", "sync": "full",
                                        "filter-node-name": fn, **extra})
        for fn, extra in (("base", {}), ("1bad", {}),
                          ("top", {"job-id": "1bad"}),
                          ("top", {"speed": -1})):
            r.cmd("block-commit", **{"job-id": "c", "device": "top",
                                     "filter-node-name": fn, **extra})
        for fn, extra in (("top", {}), ("1bad", {}),
                          ("top", {"job-id": "1bad"}),
                          ("top", {"speed": -1})):
            r.cmd("block-commit", **{"job-id": "c", "device": "top",
                                     "top-node": "mid",
                                     "filter-node-name": fn, **extra})
            if "job-id" not in extra:
                r.wait("JOB_STATUS_CHANGE", status="null")
        nodes(r)

    log = parity(tmp_path, scenario, setup=targets)
    errs = errors(log)
    assert errs[:3] == ["Duplicate nodes with node-name='top'",
                        "Invalid node-name: '1bad'",
                        "Duplicate nodes with node-name='t1'"]
    assert errs[-4:] == ["Duplicate nodes with node-name='top'",
                         "Invalid node-name: '1bad'",
                         "Invalid job ID '1bad'",
                         "Parameter 'speed' expects a non-negative value"]
    assert events(log) == ["created", "null"] * 3


def test_mirror_top_listed_as_qsd(tmp_path):
    """A slow blockdev-mirror: its mirror_top (automatic, then named) is
    the newest node, told by the device's file name, three layers deep;
    busy for blockdev-del, no root for a new job, its name taken; gone
    after the job.  query-block is empty on both (no BlockBackends)."""
    def scenario(r):
        r.chain()
        add_targets(r)
        for fn in (None, "flt"):
            a = {"job-id": "m", "device": "top", "target": "t1",
                 "sync": "full", "speed": SLOW}
            if fn:
                a["filter-node-name"] = fn
            r.cmd("blockdev-mirror", **a)
            nodes(r)
            nodes(r, flat=False)
            r.cmd("query-block")
            if fn:
                r.cmd("blockdev-del", **{"node-name": fn})
                r.cmd("blockdev-mirror", **{"job-id": "d", "device": fn,
                                            "target": "t3", "sync": "full"})
                r.cmd("block-commit", **{"job-id": "d", "device": fn})
                r.cmd("block-stream", **{"job-id": "d", "device": fn})
                r.cmd("blockdev-add", **{
                    "driver": "qcow2", "node-name": fn,
                    "file": {"driver": "file", "filename": r.p["t4"]}})
            r.cmd("blockdev-del", **{"node-name": "top"})
            r.cmd("block-job-cancel", device="m", force=True)
            r.wait("JOB_STATUS_CHANGE", status="null")
            nodes(r)
        r.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "flt",
                                 "file": {"driver": "file",
                                          "filename": r.p["f"]}})
        nodes(r)

    log = parity(tmp_path, scenario, mask=True, setup=setup_images)
    listed = [x[2] for x in log if x[0] == "nodes" and x[1]]
    assert listed[0][0][1] == "mirror_top"
    assert list(listed[2][0][:2]) == ["flt", "mirror_top"]
    assert "mirror_top" not in [n[1] for n in listed[3]]
    assert list(listed[4][0][:2]) == ["flt", "qcow2"]
    assert "Duplicate nodes with node-name='flt'" in errors(log)


def test_commit_filters_listed_as_qsd(tmp_path):
    """A slow intermediate commit lists its commit_top (read-only, told
    by mid's file name, between top and mid in top's nested listing;
    blockdev-del finds it the overlay's backing), an
    active commit its mirror_top (busy with the commit job), each
    automatic and named; both gone after the job."""
    def scenario(r):
        r.chain()
        for top in ("mid", None):
            for fn in (None, "ct"):
                a = {"job-id": "c", "device": "top", "speed": SLOW}
                if top:
                    a["top-node"] = top
                if fn:
                    a["filter-node-name"] = fn
                r.cmd("block-commit", **a)
                nodes(r)
                nodes(r, flat=False)
                r.cmd("blockdev-del", **{"node-name": fn or "mid"})
                r.cmd("blockdev-del", **{"node-name": "top"})
                r.cmd("block-job-cancel", device="c", force=True)
                r.wait("JOB_STATUS_CHANGE", status="null")
                nodes(r)

    log = parity(tmp_path, scenario, mask=True)
    listed = [x[2] for x in log if x[0] == "nodes" and x[1]]
    assert list(listed[0][0][:2]) == ["#block", "commit_top"]
    assert list(listed[2][0][:2]) == ["ct", "commit_top"]
    assert list(listed[4][0][:2]) == ["#block", "mirror_top"]
    assert "Node 'ct' is busy: node is used as backing hd of 'top'" in \
        errors(log)
    assert ("Node 'ct' is busy: block device is in use by block job: "
            "commit") in errors(log)
