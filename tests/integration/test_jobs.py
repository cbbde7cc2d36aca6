"""Block jobs in stratad: the job verbs, queries and events, against
qemu-storage-daemon as the oracle.

Each comparison runs one QMP scenario on qemu-storage-daemon and on
stratad, each on a fresh copy of the same chain, and compares the event
sequences (names and the fields that do not depend on timing) and the
replies.  Jobs that must stay alive for a while run with a low speed;
nothing asserts tight timing.
"""
import json
import time
from pathlib import Path

import pytest

from harness import run, wait_until
from harness.chains import add_top, both, check_image, make_chain, statuses
from harness.daemons import start
from harness.qcow2 import MiB as MIB


# ---- scenarios compared with qemu-storage-daemon ----


def test_plain_finish_matches_qsd(tmp_path, qemu_img, qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        assert d.ok("block-stream", **{"job-id": "j1", "device": "top"}) == {}
        evs = d.events_until("JOB_STATUS_CHANGE", status="null")
        assert d.ok("query-block-jobs") == []
        assert d.ok("query-jobs") == []
        return evs

    q, s, qp, sp = both(tmp_path, qemu_img, qemu_io, scenario)
    assert statuses(q) == ["created", "running", "waiting", "pending",
                           "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert s == q
    done = [e for e in s if e["event"] == "BLOCK_JOB_COMPLETED"][0]["data"]
    assert list(done) == ["type", "device", "len", "offset", "speed"]
    assert done["offset"] == done["len"] == 4 * MIB
    # Same content, same header, no backing file left.
    run(qemu_img, "compare", qp["top"], sp["top"])
    for path in (qp["top"], sp["top"]):
        info = json.loads(run(qemu_img, "info", "--output=json",
                              path).stdout)
        assert "backing-filename" not in info
    check_image(qemu_img, sp["top"])


def test_manual_finalize_and_dismiss_match_qsd(tmp_path, qemu_img, qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "auto-finalize": False,
                                "auto-dismiss": False})
        evs = d.events_until("BLOCK_JOB_PENDING")
        replies = [d.cmd("query-jobs"),
                   d.cmd("block-job-dismiss", id="j1"),
                   d.cmd("job-complete", id="j1"),
                   d.cmd("block-job-set-speed", device="j1", speed=1),
                   d.cmd("job-finalize", id="j1")]
        evs += d.events_until("JOB_STATUS_CHANGE", status="concluded")
        replies += [d.cmd("query-jobs"), d.cmd("query-block-jobs"),
                    d.cmd("job-cancel", id="j1"),
                    d.cmd("job-finalize", id="j1"),
                    d.cmd("job-dismiss", id="j1")]
        evs += d.events_until("JOB_STATUS_CHANGE", status="null")
        replies.append(d.cmd("query-jobs"))
        return evs, replies

    q, s, qp, sp = both(tmp_path, qemu_img, qemu_io, scenario)
    assert statuses(q[0]) == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
        "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert s == q
    run(qemu_img, "compare", qp["top"], sp["top"])


def test_cancel_in_pending_matches_qsd(tmp_path, qemu_img, qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "auto-finalize": False,
                                "auto-dismiss": False})
        evs = d.events_until("BLOCK_JOB_PENDING")
        d.ok("job-cancel", id="j1")
        evs += d.events_until("JOB_STATUS_CHANGE", status="concluded")
        replies = [d.cmd("query-jobs"), d.cmd("query-block-jobs")]
        d.ok("job-dismiss", id="j1")
        evs += d.events_until("JOB_STATUS_CHANGE", status="null")
        return evs, replies

    q, s, qp, sp = both(tmp_path, qemu_img, qemu_io, scenario)
    assert statuses(q[0])[4:] == ["BLOCK_JOB_PENDING", "aborting",
                                  "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert q[1][0]["return"][0]["error"] == "Operation canceled"
    assert s == q
    # Cancelled before prepare: the backing file is still there.
    for path in (qp["top"], sp["top"]):
        info = json.loads(run(qemu_img, "info", "--output=json",
                              path).stdout)
        assert info["backing-filename"].endswith("mid.qcow2")


def test_pause_and_cancel_match_qsd(tmp_path, qemu_img, qemu_io):
    """A slow job: pause (twice), set-speed while paused, cancel refused
    while paused unless forced; events and errors as QEMU's."""
    def scenario(d, p):
        add_top(d, p["top"])
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "speed": 65536})
        replies = [d.cmd("block-job-pause", device="j1")]
        evs = d.events_until("JOB_STATUS_CHANGE", status="paused")
        replies += [d.cmd("block-job-pause", device="j1"),
                    d.cmd("job-pause", id="j1"),
                    d.cmd("block-job-set-speed", device="j1", speed=131072),
                    d.cmd("block-job-cancel", device="j1"),
                    d.cmd("block-job-complete", device="j1")]
        info = d.ok("query-block-jobs")[0]
        replies.append({k: info[k] for k in (
            "type", "device", "len", "paused", "speed", "io-status",
            "ready", "status", "auto-finalize", "auto-dismiss")})
        replies.append(d.cmd("block-job-cancel", device="j1", force=True))
        evs += d.events_until("JOB_STATUS_CHANGE", status="null")
        for e in evs:
            e["data"].pop("offset", None)  # depends on timing
        return evs, replies

    q, s, _, _ = both(tmp_path, qemu_img, qemu_io, scenario)
    assert statuses(q[0]) == ["created", "running", "paused", "running",
                              "aborting", "BLOCK_JOB_CANCELLED", "concluded",
                              "null"]
    assert s == q


def test_verb_errors_match_qsd(tmp_path, qemu_img, qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "speed": 65536})
        calls = [
            ("block-job-resume", {"device": "j1"}),
            ("job-resume", {"id": "j1"}),
            ("block-job-complete", {"device": "j1"}),
            ("job-complete", {"id": "j1"}),
            ("block-job-finalize", {"id": "j1"}),
            ("block-job-dismiss", {"id": "j1"}),
            ("job-finalize", {"id": "j1"}),
            ("job-dismiss", {"id": "j1"}),
            ("block-job-set-speed", {"device": "j1", "speed": -1}),
            ("block-job-set-speed", {"device": "j1"}),
            ("block-job-cancel", {"device": "j1", "bogus": 1}),
            ("job-cancel", {"id": "j1", "force": True}),
            ("job-pause", {"id": 5}),
            ("block-job-pause", {}),
            ("query-jobs", {"x": 1}),
            ("query-block-jobs", {"x": 1}),
        ]
        for verb in ("set-speed", "pause", "resume", "cancel", "complete"):
            args = {"device": "nope"}
            if verb == "set-speed":
                args["speed"] = 1
            calls.append((f"block-job-{verb}", args))
        for verb in ("finalize", "dismiss"):
            calls.append((f"block-job-{verb}", {"id": "nope"}))
        for verb in ("pause", "resume", "cancel", "complete", "finalize",
                     "dismiss"):
            calls.append((f"job-{verb}", {"id": "nope"}))
        replies = [(name, d.cmd(name, **args)) for name, args in calls]
        d.ok("block-job-cancel", device="j1", force=True)
        d.events_until("JOB_STATUS_CHANGE", status="null")
        return replies

    q, s, _, _ = both(tmp_path, qemu_img, qemu_io, scenario)
    for (name, qr), (_, sr) in zip(q, s):
        assert "error" in qr, name
        assert sr == qr, name


def test_block_stream_errors_match_qsd(tmp_path, qemu_img, qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        calls = [
            {"job-id": "1bad", "device": "top"},
            {"job-id": "j1", "device": "nonode"},
            {"job-id": "j1", "device": "top", "base-node": "top"},
            {"job-id": "j1", "device": "top", "base-node": "nonode"},
            {"job-id": "j1", "device": "top", "base": "nofile.qcow2"},
            {"job-id": "j1", "device": "top", "base": "x", "base-node": "x"},
            {"job-id": "j1", "device": "top", "base": "x", "bottom": "x"},
            {"job-id": "j1", "device": "top", "bottom": "x",
             "base-node": "x"},
            {"job-id": "j1", "device": "top", "bottom": "nonode"},
            {"job-id": "j1", "device": "top", "backing-file": "foo"},
            {"job-id": "j1", "device": "top", "on-error": "bogus"},
            {"job-id": "j1", "device": "top", "bogus": 1},
            {"job-id": "j1"},
        ]
        replies = [d.cmd("block-stream", **a) for a in calls]
        # A bad speed fails after the job was created: created, null.
        replies.append(d.cmd("block-stream", **{"job-id": "j1",
                                                "device": "top",
                                                "speed": -5}))
        evs = d.events_until("JOB_STATUS_CHANGE", status="null")
        # A second job on a node in use.
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "speed": 65536})
        replies.append(d.cmd("block-stream", **{"job-id": "j2",
                                                "device": "top"}))
        replies.append(d.cmd("query-jobs"))
        d.ok("job-cancel", id="j1")
        evs += d.events_until("JOB_STATUS_CHANGE", status="null")
        replies.append(d.cmd("query-jobs"))
        for e in evs:
            e["data"].pop("offset", None)
        for r in replies:
            for j in r.get("return", []):
                j.pop("current-progress", None)
        return evs, replies

    q, s, _, _ = both(tmp_path, qemu_img, qemu_io, scenario)
    assert statuses(q[0])[:2] == ["created", "null"]
    for qr, sr in zip(q[1], s[1]):
        assert sr == qr
    assert s == q


def test_job_id_in_use_matches_qsd(tmp_path, qemu_img, qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        other = str(Path(p["top"]).parent / "other.qcow2")
        run(qemu_img, "create", "-q", "-f", "qcow2", other, "1M")
        add_top(d, other, "other")
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "speed": 65536})
        r = d.cmd("block-stream", **{"job-id": "j1", "device": "other"})
        d.ok("job-cancel", id="j1")
        d.events_until("JOB_STATUS_CHANGE", status="null")
        return r

    q, s, _, _ = both(tmp_path, qemu_img, qemu_io, scenario)
    assert q["error"]["desc"] == "Job ID 'j1' already in use"
    assert s == q


def test_no_backing_completes_at_once_matches_qsd(tmp_path, qemu_img,
                                                  qemu_io):
    """Streaming a node without a backing file is no error in QEMU: the
    job completes with len 0."""
    def scenario(d, p):
        add_top(d, p["base"], "base")
        d.ok("block-stream", **{"job-id": "j1", "device": "base"})
        return d.events_until("JOB_STATUS_CHANGE", status="null")

    q, s, _, _ = both(tmp_path, qemu_img, qemu_io, scenario)
    assert s == q


# ---- stratad alone ----


@pytest.fixture
def slow(tmp_path, qemu_img, qemu_io):
    """stratad with a 32 MiB chain and the top node added."""
    p = make_chain(tmp_path, qemu_img, qemu_io, 32)
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    yield d, p
    if d.proc.poll() is None:
        assert d.stop() == 0


def progress(d):
    j = d.ok("query-jobs")
    return j[0]["current-progress"] if j else None


def test_no_job_id_is_refused_as_qsd(slow):
    """QEMU names a job without job-id after the device's BlockBackend;
    a node made by blockdev-add has none, so the ID is '' and refused."""
    d, _ = slow
    r = d.cmd("block-stream", device="top", speed=65536)
    assert r["error"]["desc"] == "Invalid job ID ''"
    assert d.ok("query-jobs") == []


def test_pause_stops_progress_and_resume_continues(slow):
    d, _ = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 4 * MIB})
    d.ok("job-pause", id="j1")
    d.event("JOB_STATUS_CHANGE", status="paused")
    a = progress(d)
    time.sleep(0.5)
    assert progress(d) == a
    info = d.ok("query-block-jobs")[0]
    assert info["paused"] and not info["busy"] and info["status"] == "paused"
    d.ok("job-resume", id="j1")
    assert d.ok("query-jobs")[0]["status"] == "running"
    time.sleep(0.5)
    assert progress(d) > a
    d.ok("job-cancel", id="j1")
    d.event("JOB_STATUS_CHANGE", status="null")


def test_set_speed_wakes_a_sleeping_job(slow):
    """At 1 byte/s the job sleeps for hours after its first chunk; raising
    the limit must take effect at once, not after that sleep."""
    d, _ = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top", "speed": 1})
    time.sleep(0.3)
    assert d.ok("query-block-jobs")[0]["busy"] is False
    d.ok("block-job-set-speed", device="j1", speed=0)
    e = d.event("BLOCK_JOB_COMPLETED", timeout=20)
    assert e["data"]["offset"] == e["data"]["len"] == 32 * MIB
    assert e["data"]["speed"] == 0


def test_cancel_and_pause_wake_a_sleeping_job(slow):
    d, _ = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top", "speed": 1})
    time.sleep(0.3)
    t = time.monotonic()
    d.ok("job-pause", id="j1")
    d.event("JOB_STATUS_CHANGE", status="paused", timeout=5)
    d.ok("job-cancel", id="j1")
    d.event("BLOCK_JOB_CANCELLED", timeout=5)
    assert time.monotonic() - t < 5


def test_progress_is_monotonic_and_ends_at_len(slow):
    d, _ = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 16 * MIB, "auto-dismiss": False})
    seen = []

    def concluded():
        j = d.ok("query-jobs")[0]
        seen.append(j["current-progress"])
        assert j["total-progress"] == 32 * MIB
        return j["status"] == "concluded"
    wait_until(concluded, 60, 0.05, what="the job to conclude")
    assert seen == sorted(seen) and len(set(seen)) > 3
    assert seen[-1] == 32 * MIB
    e = d.event("BLOCK_JOB_COMPLETED")
    assert e["data"]["offset"] == e["data"]["len"]
    d.ok("job-dismiss", id="j1")


def test_rate_limit_is_honoured(slow):
    """2 MiB/s over 3 s, measured after the first second: within 10 %."""
    d, _ = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 2 * MIB})
    time.sleep(1)
    a, t0 = progress(d), time.monotonic()
    time.sleep(3)
    b, t1 = progress(d), time.monotonic()
    rate = (b - a) / (t1 - t0)
    assert abs(rate - 2 * MIB) < 0.1 * 2 * MIB, rate
    d.ok("job-cancel", id="j1")
    d.event("JOB_STATUS_CHANGE", status="null")


def test_blockdev_del_refused_while_streaming(slow):
    d, _ = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 65536})
    r = d.cmd("blockdev-del", **{"node-name": "top"})
    assert r["error"]["desc"].startswith("Node 'top' is busy: ")
    assert "block job" in r["error"]["desc"]
    d.ok("job-cancel", id="j1")
    d.event("JOB_STATUS_CHANGE", status="null")
    assert d.ok("blockdev-del", **{"node-name": "top"}) == {}


def test_shutdown_cancels_running_job(slow, qemu_img):
    d, p = slow
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 65536})
    t = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t < 10
    check_image(qemu_img, p["top"])


def test_snapshot_of_a_streamed_node_refused_matches_qsd(tmp_path, qemu_img,
                                                         qemu_io):
    def scenario(d, p):
        add_top(d, p["top"])
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "speed": 65536})
        snap = str(Path(p["top"]).parent / "snap.qcow2")
        r = d.cmd("blockdev-snapshot-sync", **{
            "node-name": "top", "snapshot-file": snap,
            "snapshot-node-name": "snap", "format": "qcow2"})
        d.ok("job-cancel", id="j1")
        d.events_until("JOB_STATUS_CHANGE", status="null")
        return r

    q, s, _, _ = both(tmp_path, qemu_img, qemu_io, scenario)
    assert q["error"]["desc"] == ("Node 'top' is busy: block device is in "
                                  "use by block job: stream")
    assert s == q
