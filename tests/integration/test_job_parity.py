"""Differential parity of stratad's block-job QMP surface with
qemu-storage-daemon 7.2.

Each test runs one scenario, a list of QMP commands and waits for events,
on both daemons, each over a fresh copy of the same chain added node by
node (base <- mid <- top), and compares the whole transcripts: every
reply (error class and text included) and every event in order, with
timestamps dropped and, for rate-limited jobs, the progress values that
depend on timing masked.  The images left behind are compared too.
"""
import difflib
import json
import re
from pathlib import Path

import pytest

from harness import need, run
from harness.daemons import start

MIB = 1 << 20
SLOW = 65536  # bytes/s: a 4 MiB chain takes a minute, time enough to act


@pytest.fixture(autouse=True)
def qsd():
    need("qemu-storage-daemon", "qemu-system-common")


def make_chain(d):
    """base (1s over 4 MiB) <- mid (2s at [1M, 2M)) <- top (3s at
    [0, 64k)), absolute backing names."""
    d.mkdir(parents=True)
    p = {n: str(d / f"{n}.qcow2") for n in ("base", "mid", "top")}
    run("qemu-img", "create", "-q", "-f", "qcow2", p["base"], "4M")
    for lower, upper in (("base", "mid"), ("mid", "top")):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
            p[lower], p[upper], "4M")
    for n, cmd in (("base", "write -P 1 0 4M"), ("mid", "write -P 2 1M 1M"),
                   ("top", "write -P 3 0 64k")):
        run("qemu-io", "-f", "qcow2", "-c", cmd, p[n])
    return p


class Recorder:
    """One daemon's side of a scenario: every reply and event, in order."""

    def __init__(self, daemon, paths, mask):
        self.d, self.p, self.mask = daemon, paths, mask
        self.log = []
        # Record the events that came before a reply as such (where the
        # order on the wire does not depend on timing).
        self.wire = False

    def norm(self, o):
        if isinstance(o, dict):
            o = {k: self.norm(v) for k, v in o.items() if k != "timestamp"}
            if self.mask:
                for k in ("offset", "current-progress", "busy"):
                    if k in o:
                        o[k] = "*"
            return o
        if isinstance(o, list):
            return [self.norm(x) for x in o]
        return o

    def cmd(self, name, **args):
        rsp = self.d.cmd(name, **args)
        if self.wire:
            for e in self.d.qmp.events:
                self.log.append(("before the reply", e["event"],
                                 self.norm(e.get("data"))))
            self.d.qmp.events = []
        self.log.append((name, args, self.norm(rsp)))
        return rsp

    def wait(self, name, **match):
        for e in self.d.events_until(name, **match):
            self.log.append((e["event"], self.norm(e.get("data"))))

    def add(self, node, backing=None, **extra):
        args = {"driver": "qcow2", "node-name": node,
                "file": {"driver": "file", "filename": self.p[node]}}
        if backing:
            args["backing"] = backing
        args.update(extra)
        self.cmd("blockdev-add", **args)

    def chain(self):
        self.add("base")
        self.add("mid", "base")
        self.add("top", "mid")


def guest_map(text):
    """A qemu-img map without host offsets, adjacent runs merged: what the
    guest sees where, not where the image keeps it."""
    out = []
    for e in json.loads(text):
        e = {k: v for k, v in e.items() if k != "offset"}
        if out and all(out[-1][k] == e[k] for k in e
                       if k not in ("start", "length")):
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


def image_facts(p, with_map=True, host_offsets=True):
    """Backing name, check status and allocation map of each image (not
    after a cancel, where how much was copied depends on timing)."""
    facts = {}
    for n, path in p.items():
        info = json.loads(run("qemu-img", "info", "-U", "--output=json",
                              path).stdout)
        check = run("qemu-img", "check", "-U", path, check=False)
        m = run("qemu-img", "map", "-U", "--output=json", path, check=False)
        if m.returncode != 0:
            m = m.stderr
        elif host_offsets:
            m = m.stdout
        else:
            m = guest_map(m.stdout)
        facts[n] = (info.get("backing-filename"),
                    info.get("backing-filename-format"), check.returncode,
                    m if with_map else None)
    return facts


def parity(tmp_path, scenario, mask=False, setup=None, host_offsets=True):
    """SCENARIO(recorder) on qemu-storage-daemon, then on stratad; asserts
    the transcripts and the images are the same (without where each image
    keeps its clusters unless HOST_OFFSETS: a mirror's parallel copies
    allocate in no set order).  Returns qsd's log."""
    out = {}
    for kind in ("qsd", "stratad"):
        d = tmp_path / kind
        p = make_chain(d)
        if setup:
            setup(p)
        dmn = start(kind, d)
        r = Recorder(dmn, p, mask)
        scenario(r)
        assert dmn.stop() == 0
        text = json.dumps({"log": r.log,
                           "images": image_facts(p, not mask, host_offsets)},
                          sort_keys=True, indent=1)
        text = re.sub(r"#block\d+", "#block", text.replace(str(d), "TMP"))
        out[kind] = text
    diff = "\n".join(difflib.unified_diff(
        out["qsd"].splitlines(), out["stratad"].splitlines(), "qsd",
        "stratad", lineterm=""))
    assert not diff, diff
    return json.loads(out["qsd"])["log"]


def events(log):
    return [x[0] if x[0] != "JOB_STATUS_CHANGE" else x[1]["status"]
            for x in log if len(x) == 2]


def errors(log):
    return [x[2]["error"]["desc"] for x in log
            if len(x) == 3 and "error" in x[2]]


# ---- streaming to the end ----


@pytest.mark.parametrize("args", [
    {},
    {"base-node": "base"},
    {"base-node": "base", "backing-file": "renamed.qcow2"},
    {"bottom": "mid"},
    {"bottom": "top"},
    {"auto-dismiss": False},
], ids=["whole", "base-node", "backing-file", "bottom-mid", "bottom-top",
        "no-dismiss"])
def test_stream_completes_as_qsd(tmp_path, args):
    def scenario(r):
        r.chain()
        r.cmd("block-stream", **{"job-id": "j1", "device": "top", **args})
        if args.get("auto-dismiss") is False:
            r.wait("JOB_STATUS_CHANGE", status="concluded")
            r.cmd("query-block-jobs")
            r.cmd("query-jobs")
            r.cmd("block-job-dismiss", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-jobs")

    log = parity(tmp_path, scenario)
    assert events(log)[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]


def test_base_by_file_name_and_intermediate_as_qsd(tmp_path):
    def scenario(r):
        r.chain()
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "base": r.p["base"]})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("block-stream", **{"job-id": "j2", "device": "top",
                                 "base": r.p["mid"]})
        r.cmd("block-stream", **{"job-id": "j2", "device": "mid"})
        r.wait("JOB_STATUS_CHANGE", status="null")

    parity(tmp_path, scenario)


def test_manual_finalize_as_qsd(tmp_path):
    def scenario(r):
        r.chain()
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "auto-finalize": False,
                                 "auto-dismiss": False})
        r.wait("BLOCK_JOB_PENDING")
        for name, args in (("query-block-jobs", {}), ("query-jobs", {}),
                           ("job-dismiss", {"id": "j1"}),
                           ("block-job-complete", {"device": "j1"}),
                           ("block-job-pause", {"device": "j1"}),
                           ("block-job-finalize", {"id": "j1"})):
            r.cmd(name, **args)
        r.wait("JOB_STATUS_CHANGE", status="concluded")
        r.cmd("job-finalize", id="j1")
        r.cmd("job-dismiss", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario)
    assert "BLOCK_JOB_PENDING" in events(log)


# ---- refused commands ----


def test_block_stream_errors_in_qsd_order(tmp_path):
    """Each refusal, and which check wins when several apply: the
    base/base-node/bottom conflicts before the device lookup, the filter
    name before the job ID, a missing job-id is '' (no BlockBackend)."""
    def scenario(r):
        r.chain()
        raw = Path(r.p["top"]).parent / "x.raw"
        raw.write_bytes(b"")
        r.cmd("blockdev-add", **{"driver": "blkdebug", "node-name": "dbg",
                                 "image": {"driver": "file",
                                           "filename": str(raw)}})
        for a in [
            {"device": "nonode", "base": "x", "base-node": "y"},
            {"device": "nonode", "bottom": "x", "base-node": "y"},
            {"device": "nonode", "base": "x", "bottom": "y"},
            {"job-id": "1bad", "device": "nonode"},
            {"job-id": "1bad", "device": "top", "filter-node-name": "2bad"},
            {"job-id": "1bad", "device": "top", "backing-file": "x"},
            {"job-id": "j1", "device": "top", "bottom": "mid",
             "backing-file": "x"},
            {"job-id": "1bad", "device": "top", "speed": -1},
            {"device": "top"},
            {"job-id": "", "device": "top"},
            {"job-id": "j1", "device": "top", "filter-node-name": "mid"},
            {"job-id": "j1", "device": "top", "filter-node-name": ""},
            {"job-id": "j1", "device": "top", "base-node": "top"},
            {"job-id": "j1", "device": "mid", "base-node": "top"},
            {"job-id": "j1", "device": "top", "base": "nofile.qcow2"},
            {"job-id": "j1", "device": "top", "bottom": "dbg"},
            {"job-id": "j1", "device": "mid", "bottom": "top"},
            {"job-id": "j1", "device": "top", "on-error": "nope"},
        ]:
            r.cmd("block-stream", **a)
        # A bad speed is found after the job was created: created, null.
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "speed": -1})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("query-jobs")

    log = parity(tmp_path, scenario)
    errs = errors(log)
    assert errs[:3] == [
        "'base' and 'base-node' cannot be specified at the same time",
        "'bottom' and 'base-node' cannot be specified at the same time",
        "'base' and 'bottom' cannot be specified at the same time"]
    assert "Could not create node: Invalid node-name: '2bad'" in errs
    assert errs.count("Invalid job ID ''") == 2
    assert events(log) == ["created", "null"]


def test_verbs_on_unknown_jobs_as_qsd(tmp_path):
    def scenario(r):
        r.chain()
        for verb in ("set-speed", "pause", "resume", "cancel", "complete"):
            args = {"device": "nope"}
            if verb == "set-speed":
                args["speed"] = 1
            r.cmd(f"block-job-{verb}", **args)
        for verb in ("finalize", "dismiss"):
            r.cmd(f"block-job-{verb}", id="nope")
        for verb in ("pause", "resume", "cancel", "complete", "finalize",
                     "dismiss"):
            r.cmd(f"job-{verb}", id="nope")

    log = parity(tmp_path, scenario)
    assert {x[2]["error"]["class"] for x in log if x[0].startswith("block-")
            and "error" in x[2]} == {"DeviceNotActive"}
    assert {x[2]["error"]["class"] for x in log if x[0].startswith("job-")
            } == {"GenericError"}


# ---- a running job ----


def test_nodes_held_by_a_job_as_qsd(tmp_path):
    """blockdev-del of every node in the streamed chain says the job holds
    it (its blocker is newer than the backing edge), a second stream is
    refused, and everything is free again after the cancel."""
    def scenario(r):
        r.chain()
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "speed": SLOW})
        for n in ("top", "mid", "base"):
            r.cmd("blockdev-del", **{"node-name": n})
            r.cmd("block-stream", **{"job-id": "j2", "device": n})
        r.cmd("block-stream", **{"job-id": "j1", "device": "base"})
        r.cmd("block-job-cancel", device="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")
        for n in ("top", "mid", "base"):
            r.cmd("blockdev-del", **{"node-name": n})

    log = parity(tmp_path, scenario, mask=True)
    assert ("Node 'mid' is busy: block device is in use by block job: "
            "stream") in errors(log)


def test_pause_resume_cancel_as_qsd(tmp_path):
    def scenario(r):
        r.chain()
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "speed": SLOW, "auto-dismiss": False})
        r.cmd("job-resume", id="j1")
        r.cmd("block-job-complete", device="j1")
        r.cmd("job-finalize", id="j1")
        r.cmd("job-dismiss", id="j1")
        r.cmd("job-pause", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="paused")
        for name, args in (("block-job-pause", {"device": "j1"}),
                           ("job-pause", {"id": "j1"}),
                           ("query-block-jobs", {}),
                           ("block-job-cancel", {"device": "j1"}),
                           ("block-job-set-speed", {"device": "j1",
                                                    "speed": -1}),
                           ("block-job-set-speed", {"device": "j1",
                                                    "speed": SLOW}),
                           ("block-job-resume", {"device": "j1"}),
                           ("query-jobs", {}),
                           ("block-job-pause", {"device": "j1"})):
            r.cmd(name, **args)
        r.wait("JOB_STATUS_CHANGE", status="paused")
        r.cmd("block-job-cancel", device="j1", force=True)
        r.wait("JOB_STATUS_CHANGE", status="concluded")
        for name in ("cancel", "pause", "resume"):
            r.cmd(f"block-job-{name}", device="j1")
        r.cmd("block-job-set-speed", device="j1", speed=1)
        r.cmd("query-block-jobs")
        r.cmd("block-job-dismiss", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, mask=True)
    assert "BLOCK_JOB_CANCELLED" in events(log)


# ---- I/O errors: blkdebug under mid fails its first data cluster ----


def blkdebug_mid(r, errno=5, once=True):
    r.add("base")
    m = json.loads(run("qemu-img", "map", "-U", "--output=json",
                       r.p["mid"]).stdout)
    host = [e for e in m if e["depth"] == 0 and e["data"]][0]["offset"]
    r.cmd("blockdev-add", **{
        "driver": "qcow2", "node-name": "mid", "backing": "base",
        "file": {"driver": "blkdebug", "node-name": "dbg",
                 "image": {"driver": "file", "filename": r.p["mid"]},
                 "inject-error": [{"event": "read_aio", "errno": errno,
                                   "sector": host // 512, "once": once}]}})
    r.add("top", "mid")


@pytest.mark.parametrize("mode,errno", [("stop", 5), ("enospc", 28),
                                        ("report", 5), ("enospc", 5),
                                        ("ignore", 5)])
def test_on_error_as_qsd(tmp_path, mode, errno):
    """Progress at the error is where QEMU's is: its chunks end where a
    lower layer's allocation changes, so the failing chunk starts at
    mid's data (1 MiB), with the offsets compared unmasked."""
    def scenario(r):
        blkdebug_mid(r, errno)
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "on-error": mode, "auto-dismiss": False})
        if mode == "stop" or errno == 28:
            r.wait("JOB_STATUS_CHANGE", status="paused")
            for name, args in (("query-block-jobs", {}),
                               ("job-pause", {"id": "j1"}),
                               ("block-job-cancel", {"device": "j1"}),
                               ("block-job-resume", {"device": "j1"})):
                r.cmd(name, **args)
        r.wait("JOB_STATUS_CHANGE", status="concluded")
        r.cmd("query-block-jobs")
        r.cmd("query-jobs")
        r.cmd("job-dismiss", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario)
    assert "BLOCK_JOB_ERROR" in events(log)


def test_stop_twice_then_cancel_as_qsd(tmp_path):
    def scenario(r):
        blkdebug_mid(r, once=False)
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "on-error": "stop"})
        r.wait("JOB_STATUS_CHANGE", status="paused")
        r.cmd("job-resume", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="paused")
        r.cmd("query-jobs")
        r.cmd("job-cancel", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario)
    assert events(log).count("BLOCK_JOB_ERROR") == 2


def test_events_before_replies_as_qsd(tmp_path):
    """Where QEMU runs the job to its next yield before it replies, the
    events come before the reply: a stream with nothing to copy, the
    cancel of a paused job, job-finalize, job-dismiss."""
    def scenario(r):
        r.chain()
        r.wire = True
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "base-node": "mid"})
        r.wire = False
        r.cmd("block-stream", **{"job-id": "j2", "device": "top",
                                 "speed": SLOW, "auto-dismiss": False})
        r.cmd("job-pause", id="j2")
        r.wait("JOB_STATUS_CHANGE", status="paused")
        r.wire = True
        r.cmd("job-cancel", id="j2")
        r.cmd("job-dismiss", id="j2")
        r.wire = False
        r.cmd("block-stream", **{"job-id": "j3", "device": "top",
                                 "base-node": "base",
                                 "auto-finalize": False})
        r.wait("BLOCK_JOB_PENDING")
        r.wire = True
        r.cmd("job-finalize", id="j3")

    log = parity(tmp_path, scenario, mask=True)
    before = [x[1] for x in log if x[0] == "before the reply"]
    assert before.count("BLOCK_JOB_COMPLETED") == 2
    assert "BLOCK_JOB_CANCELLED" in before


# ---- the copy-on-read filter a stream puts over its device ----


def nodes(r):
    """query-named-block-nodes without the sizes (which depend on how far
    the job got)."""
    rsp = r.d.cmd("query-named-block-nodes", flat=True)
    r.log.append(("nodes", [(n["node-name"], n["drv"], n["file"])
                            for n in rsp["return"]]))


def test_filter_node_as_qsd(tmp_path):
    """The filter is listed while the job runs (named by
    filter-node-name, or automatically and then told by its child's
    file), is in use and its name taken, and is gone after the job."""
    def scenario(r):
        r.chain()
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "speed": SLOW, "filter-node-name": "cor"})
        nodes(r)
        for n in ("cor", "top", "mid", "base"):
            r.cmd("blockdev-del", **{"node-name": n})
        r.cmd("block-stream", **{"job-id": "j2", "device": "cor"})
        r.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "cor",
                                 "file": {"driver": "file",
                                          "filename": r.p["base"]}})
        r.cmd("job-cancel", id="j1")
        r.wait("JOB_STATUS_CHANGE", status="null")
        nodes(r)
        r.cmd("blockdev-del", **{"node-name": "cor"})
        r.cmd("block-stream", **{"job-id": "j2", "device": "top",
                                 "speed": SLOW})
        nodes(r)
        r.cmd("job-cancel", id="j2")
        r.wait("JOB_STATUS_CHANGE", status="null")
        nodes(r)

    log = parity(tmp_path, scenario, mask=True)
    listed = [x[1] for x in log if x[0] == "nodes"]
    assert ["cor", "copy-on-read"] in [n[:2] for n in listed[0]]
    assert "cor" not in [n[0] for n in listed[1]]
    assert "Node cor is in use" in errors(log)


def test_device_behind_a_filter_as_qsd(tmp_path):
    """A filter as the device streams the image under it; a second
    filter over the device (blockdev-add copy-on-read) is no conflict;
    copy-on-read's bottom checks come before any permission question."""
    def scenario(r):
        r.chain()
        r.cmd("blockdev-add", **{"driver": "blkdebug", "node-name": "dbg",
                                 "image": "top"})
        r.cmd("blockdev-add", **{"driver": "copy-on-read", "node-name": "cor",
                                 "file": "top"})
        for bottom in ("nonode", "cor", "top"):
            r.cmd("blockdev-add", **{"driver": "copy-on-read",
                                     "node-name": "c2", "file": "top",
                                     "bottom": bottom})
            r.cmd("blockdev-del", **{"node-name": "c2"})
        r.cmd("block-stream", **{"job-id": "j1", "device": "dbg",
                                 "base-node": "base"})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("block-stream", **{"job-id": "j2", "device": "cor"})
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario)
    assert events(log).count("BLOCK_JOB_COMPLETED") == 2
    assert "Bottom node 'nonode' not found" in errors(log)


def test_base_named_relative_to_the_overlay_as_qsd(tmp_path):
    """Images whose backing names are relative, top added alone (its
    chain opened from the headers): 'base' as the header names it is
    found, and a stream with nothing to copy still rewrites the name."""
    def relative(p):
        for n, b in (("mid", "base.qcow2"), ("top", "mid.qcow2")):
            run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", b, p[n])

    def scenario(r):
        r.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "top",
                                 "file": {"driver": "file",
                                          "filename": r.p["top"]}})
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "base": "nothere.qcow2"})
        r.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "base": r.p["mid"]})
        r.wait("JOB_STATUS_CHANGE", status="null")
        r.cmd("block-stream", **{"job-id": "j2", "device": "top",
                                 "base": "base.qcow2"})
        r.wait("JOB_STATUS_CHANGE", status="null")

    log = parity(tmp_path, scenario, setup=relative)
    assert events(log).count("BLOCK_JOB_COMPLETED") == 2


def test_jobs_listed_newest_first_as_qsd(tmp_path):
    def second_chain(p):
        d = Path(p["top"]).parent
        p["obase"], p["otop"] = str(d / "obase.qcow2"), str(d / "otop.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", p["obase"], "4M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4M", p["obase"])
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
            p["obase"], p["otop"], "4M")

    def scenario(r):
        r.chain()
        r.add("otop")
        for job, dev in (("j1", "top"), ("j2", "otop")):
            r.cmd("block-stream", **{"job-id": job, "device": dev,
                                     "speed": SLOW})
        r.cmd("query-jobs")
        r.cmd("query-block-jobs")
        for job in ("j1", "j2"):
            r.cmd("job-cancel", id=job)
            r.wait("JOB_STATUS_CHANGE", status="null", id=job)

    log = parity(tmp_path, scenario, mask=True, setup=second_chain)
    listed = [x[2]["return"] for x in log if x[0] == "query-jobs"][0]
    assert [j["id"] for j in listed] == ["j2", "j1"]
