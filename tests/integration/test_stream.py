"""block-stream in stratad: the resulting images and chains, against
qemu-storage-daemon and qemu-img as oracles; on-error through an NBD
backing file served by nbdkit's error filter; x-block-pull-range and the
idle-aware options."""
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import need, run, spawn, wait_for_path
from harness.chains import (add_top, both, check_image, make_chain,
                            statuses)
from harness.daemons import start
from harness.qcow2 import MiB as MIB


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def info(qemu_img, path):
    return json.loads(run(qemu_img, "info", "--output=json", path).stdout)


def test_intermediate_stream_keeps_base(tmp_path, qemu_img, qemu_io):
    """base <- mid <- top, stream top down to base: base <- top, the base
    file untouched, the guest view unchanged, the header as QEMU writes
    it."""
    def scenario(d, p):
        ref = str(Path(p["top"]).parent / "ref.raw")
        run(qemu_img, "convert", "-O", "raw", p["top"], ref)
        before = sha256(p["base"])
        add_top(d, p["top"])
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "base": p["base"]})
        evs = d.events_until("JOB_STATUS_CHANGE", status="null")
        nodes = d.ok("query-named-block-nodes")
        top = [n for n in nodes if n["node-name"] == "top"][0]
        return evs, before, ref, top["backing_file_depth"]

    q, s, qp, sp = both(tmp_path, qemu_img, qemu_io, scenario)
    assert s[0] == q[0]
    assert s[3] == q[3] == 1
    for r, p in ((q, qp), (s, sp)):
        assert sha256(p["base"]) == r[1]
        run(qemu_img, "compare", r[2], p["top"])
        i = info(qemu_img, p["top"])
        assert i["backing-filename"] == p["base"]
        assert i["backing-filename-format"] == "qcow2"
    check_image(qemu_img, sp["top"])
    # The top holds what mid held, nothing of base: same map as QEMU's.
    def m(path):
        return [(e["start"], e["length"], e["depth"], e["data"])
                for e in json.loads(run(qemu_img, "map", "--output=json",
                                        path).stdout)]
    assert m(sp["top"]) == m(qp["top"])


@pytest.mark.parametrize("how", ["base-node", "bottom", "backing-file"])
def test_base_node_bottom_and_backing_file(tmp_path, qemu_img, qemu_io,
                                           how):
    def scenario(d, p):
        d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "base",
                                "read-only": True,
                                "file": {"driver": "file",
                                         "filename": p["base"]}})
        d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "mid",
                                "read-only": True, "backing": "base",
                                "file": {"driver": "file",
                                         "filename": p["mid"]}})
        d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "top",
                                "backing": "mid",
                                "file": {"driver": "file",
                                         "filename": p["top"]}})
        args = {"job-id": "j1", "device": "top"}
        if how == "base-node":
            args["base-node"] = "base"
        elif how == "bottom":
            args["bottom"] = "mid"
        else:
            args.update({"base-node": "base", "backing-file": "base.qcow2"})
        d.ok("block-stream", **args)
        evs = d.events_until("JOB_STATUS_CHANGE", status="null")
        # mid is no longer anybody's backing: it can go.
        r = d.cmd("blockdev-del", **{"node-name": "mid"})
        return evs, r

    q, s, qp, sp = both(tmp_path, qemu_img, qemu_io, scenario)
    assert s == q
    assert q[1] == {"return": {}}
    want = "base.qcow2" if how == "backing-file" else None
    for p in (qp, sp):
        assert info(qemu_img, p["top"])["backing-filename"] == (
            want or p["base"])
    run(qemu_img, "compare", qp["top"], sp["top"])


def test_zeros_stay_zero_clusters(tmp_path, qemu_img, qemu_io):
    """A zeroed range in mid becomes zero clusters in top, not data."""
    p = make_chain(tmp_path, qemu_img, qemu_io, 4)
    run(qemu_io, "-f", "qcow2", "-c", "write -z 2M 1M", p["mid"])
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("block-stream", **{"job-id": "j1", "device": "top"})
    d.event("JOB_STATUS_CHANGE", status="null")
    assert d.stop() == 0
    m = json.loads(run(qemu_img, "map", "--output=json", p["top"]).stdout)
    at2m = [e for e in m if e["start"] <= 2 * MIB < e["start"] + e["length"]]
    assert at2m[0]["zero"] and not at2m[0]["data"]
    out = run(qemu_io, "-f", "qcow2", "-c", "read -P 0 2M 1M", "-c",
              "read -P 1 3M 1M", "-c", "read -P 2 1M 1M", p["top"]).stdout
    assert "Pattern verification failed" not in out


# ---- on-error, with an NBD backing file whose reads fail on demand ----


@pytest.fixture
def failing_backing(tmp_path, qemu_img):
    """top.qcow2 over a raw NBD backing file served by nbdkit (pattern
    plugin, 4 MiB) whose reads fail with EIO while ERRFILE exists."""
    nbdkit = need("nbdkit", "nbdkit")
    sock = tmp_path / "nbd.sock"
    errfile = tmp_path / "fail"
    proc = spawn(
        [nbdkit, "-f", "-U", str(sock), "--filter=error", "pattern",
         "size=4M", "error=EIO", "error-rate=100%",
         f"error-file={errfile}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc, "nbdkit", timeout=5, interval=0.025)
    uri = f"nbd+unix:///?socket={sock}"
    made = {}

    def make(kind):
        top = tmp_path / kind / "top.qcow2"
        top.parent.mkdir(exist_ok=True)
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw",
            str(top), "4M")
        made[kind] = str(top)
        return str(top)

    yield make, errfile
    proc.terminate()
    proc.wait()


@pytest.mark.parametrize("mode", ["report", "ignore", "stop", "enospc"])
def test_on_error_matches_qsd(tmp_path, qemu_img, failing_backing, mode):
    make, errfile = failing_backing
    results = {}
    for kind in ("qsd", "stratad"):
        top = make(kind)
        d = start(kind, tmp_path / kind)
        add_top(d, top)
        errfile.touch()
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "on-error": mode})
        evs = d.events_until("BLOCK_JOB_ERROR")
        replies = []
        if mode == "stop":
            evs += d.events_until("JOB_STATUS_CHANGE", status="paused")
            info = d.ok("query-block-jobs")[0]
            replies.append((info["io-status"], info["status"],
                            info["paused"], info["offset"]))
            errfile.unlink()
            d.ok("block-job-resume", device="j1")
        else:
            errfile.unlink(missing_ok=True)
        evs += d.events_until("JOB_STATUS_CHANGE", status="null")
        for e in evs:
            if mode != "ignore" and e["event"] != "JOB_STATUS_CHANGE":
                e["data"].pop("offset", None)
        if mode == "ignore":
            # How many chunks fail before the test removes ERRFILE depends
            # on timing: compare one error event for each run of them.
            evs = [e for i, e in enumerate(evs)
                   if i == 0 or e != evs[i - 1]]
        results[kind] = (evs, replies)
        assert d.stop() == 0
        check_image(qemu_img, top)
    assert results["stratad"] == results["qsd"]
    seq = statuses(results["qsd"][0])
    if mode == "stop":
        assert seq[:4] == ["created", "running", "BLOCK_JOB_ERROR", "paused"]
        assert results["qsd"][1][0][:3] == ("failed", "paused", True)
        assert seq[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    else:
        assert "aborting" in seq
        done = [e for e in results["qsd"][0]
                if e["event"] == "BLOCK_JOB_COMPLETED"][0]
        assert done["data"]["error"] == "Input/output error"


def test_stop_then_resume_copies_everything(tmp_path, qemu_img,
                                            failing_backing):
    make, errfile = failing_backing
    top = make("stratad")
    d = start("stratad", tmp_path)
    add_top(d, top)
    errfile.touch()
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "on-error": "stop"})
    d.event("BLOCK_JOB_ERROR")
    d.event("JOB_STATUS_CHANGE", status="paused")
    # Resuming while the error persists stops again at the same offset.
    off = d.ok("query-jobs")[0]["current-progress"]
    d.ok("block-job-resume", device="j1")
    d.event("BLOCK_JOB_ERROR")
    d.event("JOB_STATUS_CHANGE", status="paused")
    assert d.ok("query-jobs")[0]["current-progress"] == off
    errfile.unlink()
    d.ok("block-job-resume", device="j1")
    assert d.ok("query-block-jobs")[0]["io-status"] == "ok"
    e = d.event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"]
    assert d.stop() == 0
    assert "backing-filename" not in info(qemu_img, top)
    # The pattern plugin's bytes are the 8-byte big-endian offsets.
    data = Path(tmp_path / "out.raw")
    run(qemu_img, "convert", "-O", "raw", top, str(data))
    raw = data.read_bytes()
    for off in (0, 8, 1 << 20, (4 << 20) - 8):
        assert int.from_bytes(raw[off:off + 8], "big") == off


# ---- x-block-pull-range and the idle-aware options ----


def test_pull_range(tmp_path, qemu_img, qemu_io):
    p = make_chain(tmp_path, qemu_img, qemu_io, 8)
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    r = d.ok("x-block-pull-range", device="top", offset=2 * MIB,
             length=MIB)
    assert r == {"copied": MIB}
    # Again: nothing left to copy there.
    assert d.ok("x-block-pull-range", device="top", offset=2 * MIB,
                length=MIB) == {"copied": 0}
    errs = [d.cmd("x-block-pull-range", device="top", offset=7 * MIB,
                  length=2 * MIB),
            d.cmd("x-block-pull-range", device="top", offset=-1, length=1),
            d.cmd("x-block-pull-range", device="top", offset=0,
                  length=64 * MIB),
            d.cmd("x-block-pull-range", device="nonode", offset=0,
                  length=1),
            d.cmd("x-block-pull-range", device="top", offset=0)]
    descs = [e["error"]["desc"] for e in errs]
    assert descs[0] == ("Range offset 7340032 length 2097152 is outside "
                        "the image (8388608 bytes)")
    assert descs[1].startswith("Range offset -1")
    assert descs[2].startswith("Parameter 'length' must be at most")
    assert descs[3] == "Cannot find device='nonode' nor node-name='nonode'"
    assert descs[4] == "Parameter 'length' is missing"
    assert d.stop() == 0
    m = json.loads(run(qemu_img, "map", "--output=json", p["top"]).stdout)
    top_ranges = [(e["start"], e["length"]) for e in m if e["depth"] == 0]
    assert (2 * MIB, MIB) in top_ranges
    # The rest still comes from below, and the guest view is unchanged.
    assert any(e["depth"] > 0 for e in m)
    out = run(qemu_io, "-f", "qcow2", "-c", "read -P 1 2M 1M", p["top"])
    assert "Pattern verification failed" not in out.stdout
    check_image(qemu_img, p["top"])


def test_yield_to_guest_idle_runs_at_full_speed(tmp_path, qemu_img,
                                                qemu_io):
    """With no guest requests in flight the floor does not apply: a job
    with floor 0 (wait while the guest is busy) still finishes."""
    p = make_chain(tmp_path, qemu_img, qemu_io, 16)
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    r = d.cmd("block-stream", **{"job-id": "j1", "device": "top",
                                 "x-guest-floor-speed": -1})
    assert r["error"]["desc"] == ("Parameter 'x-guest-floor-speed' expects "
                                  "a non-negative value")
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "x-yield-to-guest": True,
                            "x-guest-floor-speed": 0})
    e = d.event("BLOCK_JOB_COMPLETED", timeout=30)
    assert e["data"]["offset"] == 16 * MIB
    assert d.stop() == 0
    check_image(qemu_img, p["top"])


# ---- guest writes during the stream, through stratad's NBD export ----


def test_guest_writes_during_stream_win(tmp_path, qemu_img, qemu_io):
    """Writes through the export while the job copies: none is lost or
    overwritten by a stale copy; the result equals the chain plus the
    writes, applied to a raw reference."""
    p = make_chain(tmp_path, qemu_img, qemu_io, 16)
    ref = str(tmp_path / "ref.raw")
    run(qemu_img, "convert", "-O", "raw", p["top"], ref)
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    sock = str(tmp_path / "nbd.sock")
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    d.ok("block-export-add", type="nbd", id="e0", **{"node-name": "top"},
         writable=True)
    # 256 KiB/s over 16 MiB (a minute): the job is still copying while
    # the writes go in, even on a heavily loaded machine
    # (block-job-set-speed below fails if it has already ended).
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 256 * 1024})
    uri = f"nbd+unix:///top?socket={sock}"
    for i, off in enumerate((0, 5 * MIB + 4096, 12 * MIB, 1 * MIB + 512,
                             15 * MIB)):
        cmd = f"write -P {0x40 + i} {off} 100k"
        run(qemu_io, "-f", "raw", "-c", cmd, uri)
        run(qemu_io, "-f", "raw", "-c", cmd, ref)
        time.sleep(0.1)
    d.ok("block-job-set-speed", device="j1", speed=0)
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"]
    d.ok("block-export-del", id="e0")
    assert d.stop() == 0
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["top"], ref)
    check_image(qemu_img, p["top"])


def test_yield_to_guest_backs_off_while_guest_writes(tmp_path, qemu_img,
                                                     qemu_io):
    """x-yield-to-guest with a floor of 1 MiB/s: while a guest writes
    through the export without pause the job crawls near the floor; once
    the guest stops it runs unthrottled to the end."""
    import threading
    import nbd
    p = make_chain(tmp_path, qemu_img, qemu_io, 64)
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    sock = str(tmp_path / "nbd.sock")
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    d.ok("block-export-add", type="nbd", id="e0", **{"node-name": "top"},
         writable=True)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///top?socket={sock}")
    stop = threading.Event()

    def guest():
        buf = b"\x55" * 65536
        while not stop.is_set():
            h.pwrite(buf, 63 * MIB)

    t = threading.Thread(target=guest)
    t.start()
    # A second guest in C (fio, four writes in flight) keeps requests in
    # flight while the Python one waits for the interpreter: a gap of
    # 50 ms would rightly count as idle.
    fio = spawn(
        [need("fio", "fio"), "--name=g", "--ioengine=nbd",
         f"--uri=nbd+unix:///top?socket={sock}", "--rw=write", "--bs=64k",
         "--offset=62M", "--size=64k", "--iodepth=4", "--time_based",
         "--runtime=3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        d.ok("block-stream", **{"job-id": "j1", "device": "top",
                                "x-yield-to-guest": True,
                                "x-guest-floor-speed": MIB})
        time.sleep(0.5)
        a, t0 = d.ok("query-jobs")[0]["current-progress"], time.monotonic()
        time.sleep(1.5)
        b, t1 = d.ok("query-jobs")[0]["current-progress"], time.monotonic()
    finally:
        stop.set()
        t.join()
        fio.wait(timeout=60)
    busy_rate = (b - a) / (t1 - t0)
    assert busy_rate < 4 * MIB, busy_rate
    e = d.event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in e["data"] and e["data"]["offset"] == 64 * MIB
    h.shutdown()
    d.ok("block-export-del", id="e0")
    assert d.stop() == 0
    out = run(qemu_io, "-f", "qcow2", "-c", "read -P 0x55 63M 64k",
              "-c", "read -P 1 32M 1M", p["top"]).stdout
    assert "Pattern verification failed" not in out
    check_image(qemu_img, p["top"])


def test_read_only_device_streams_and_stays_read_only(tmp_path, qemu_img,
                                                      qemu_io):
    """QEMU makes a read-only device writable for the job and read-only
    again afterwards."""
    def scenario(d, p):
        d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "top",
                                "read-only": True,
                                "file": {"driver": "file",
                                         "filename": p["top"]}})
        d.ok("block-stream", **{"job-id": "j1", "device": "top"})
        evs = d.events_until("JOB_STATUS_CHANGE", status="null")
        ro = [n["ro"] for n in d.ok("query-named-block-nodes")
              if n["node-name"] == "top"]
        return evs, ro

    q, s, qp, sp = both(tmp_path, qemu_img, qemu_io, scenario)
    assert q[1] == [True]
    assert s == q
    run(qemu_img, "compare", qp["top"], sp["top"])
    assert "backing-filename" not in info(qemu_img, sp["top"])
