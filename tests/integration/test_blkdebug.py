"""The blkdebug filter: errors injected at a chosen offset only.

From strata-io (dotted -o options under the format) the rule's requests
covering the chosen sector fail with the rule's errno and every other
request passes, as qemu-io with the same rule in json: syntax shows.  From
stratad, the blockdev-add definitions qemu-storage-daemon accepts are
accepted (and the bad ones refused with the same message), and an NBD
export over the filter fails reads at the sector alone, for both daemons.
"""
import json

import pytest

from harness import binary, drop_timing, file_state, make_image, need, run
from harness.chains import statuses
from harness.daemons import Monitor, start

SECTOR = 8  # byte 4096


def sio(img, *cmds, opts="", fmt="raw", check=False):
    args = [binary("strata-io"), "-f", fmt, "-o",
            "file.driver=blkdebug" + ("," + opts if opts else "")]
    for c in cmds:
        args += ["-c", c]
    return run(*args, img, check=check)


def rule(n=0, **kw):
    return ",".join(f"file.inject-error.{n}.{k}={v}" for k, v in kw.items())


@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "x.raw", data=bytes(range(256)) * 4096)


def test_read_error_at_sector_only(img):
    p = sio(img, "read 0 4k", "read 4k 512", "read 2k 4k", "read 8k 4k",
            "write 4k 4k", opts=rule(event="read_aio", sector=SECTOR))
    assert p.returncode == 1
    lines = drop_timing(p.stdout)
    assert lines[0] == "read 4096/4096 bytes at offset 0"
    assert lines[1].startswith("read failed: Input/output error")
    assert "injected read error at offset 4096" in lines[1]
    assert lines[2].startswith("read failed: Input/output error")
    assert lines[3] == "read 4096/4096 bytes at offset 8192"
    assert lines[4] == "wrote 4096/4096 bytes at offset 4096"


def test_same_reads_fail_as_with_qemu_io(img):
    """Reads only (QEMU arms the rule on the first read of raw)."""
    cmds = ["read 0 4k", "read 4k 512", "read 4090 8", "read 4608 4k",
            "read 0 1M"]
    p = sio(img, *cmds, opts=rule(event="read_aio", sector=SECTOR))
    js = ('json:{"driver":"raw","file":{"driver":"blkdebug","inject-error":'
          f'[{{"event":"read_aio","sector":{SECTOR}}}],"image":'
          f'{{"driver":"file","filename":"{img}"}}}}}}')
    q = run(need("qemu-io", "qemu-utils"), *sum((["-c", c] for c in cmds),
                                               []), js, check=False)
    ours = [line.split(" (")[0] for line in drop_timing(p.stdout)]
    assert ours == drop_timing(q.stdout)
    assert p.returncode == q.returncode == 1


def test_errno_and_once(img):
    p = sio(img, "read 4k 4k", "read 4k 4k",
            opts=rule(event="read_aio", sector=SECTOR, errno=28, once="on"))
    lines = drop_timing(p.stdout)
    assert lines[0].startswith("read failed: No space left on device")
    assert lines[1] == "read 4096/4096 bytes at offset 4096"


def test_write_zeroes_flush_and_iotype(img):
    before = file_state(img)
    p = sio(img, "write 0 4k", "write -z 4k 4k", "flush", "read 0 4k",
            opts=",".join([rule(0, event="write_aio"),
                           rule(1, event="pwritev_zero", sector=SECTOR),
                           rule(2, event="read_aio", iotype="flush")]))
    lines = drop_timing(p.stdout)
    assert lines[0].startswith("write failed: Input/output error")
    assert lines[1].startswith("write failed: Input/output error")
    assert lines[2].startswith("flush failed: Input/output error")
    assert lines[3] == "read 4096/4096 bytes at offset 0"
    assert file_state(img) == before


def test_under_qcow2(tmp_path):
    q = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", q, "1M")
    run("qemu-io", "-c", "write -P 0x5c 0 1M", q)
    # Fail the host cluster holding guest offset 0 (from qemu-img map).
    m = json.loads(run("qemu-img", "map", "--output=json", q).stdout)
    host = m[0]["offset"]
    p = sio(q, "read -P 0x5c 64k 64k", "read 0 4k", fmt="qcow2",
            opts=rule(event="read_aio", sector=host // 512))
    lines = drop_timing(p.stdout)
    assert lines[0] == "read 65536/65536 bytes at offset 65536"
    assert lines[1].startswith("read failed: Input/output error")


@pytest.mark.parametrize("opts,msg", [
    (rule(event="l2_load"), "event 'l2_load' is not supported"),
    (rule(event="bogus"), "Parameter 'event' does not accept value 'bogus'"),
    (rule(event="read_aio", iotype="x"),
     "Parameter 'iotype' does not accept value 'x'"),
    (rule(sector=3), "Missing event name for rule"),
    (rule(event="read_aio", foo=1), "unknown option 'inject-error.0.foo'"),
    (rule(event="read_aio", errno="x"), "expected an integer"),
    (rule(event="read_aio", errno=0),
     "inject-error.0.errno: expected an integer from 1 to 4095, got '0'"),
    (rule(event="read_aio", sector=-2),
     "inject-error.0.sector: expected an integer from -1 to"),
    (rule(event="read_aio", once="maybe"), "expects 'on' or 'off'"),
    ("file.image=x,file.image.filename=y", "give one of 'image'"),
    (rule(event="read_aio", state=2), "states are not supported"),
    ("file.config=/dev/null", "config files are not supported"),
])
def test_bad_rules_are_refused(img, opts, msg):
    p = sio(img, "read 0 512", opts=opts)
    assert p.returncode == 1
    assert msg in p.stderr and p.stderr.count("\n") == 1, p.stderr


# ---- stratad and qemu-storage-daemon ----

def daemons():
    return [("qsd", need("qemu-storage-daemon", "qemu-system-common")),
            ("stratad", binary("stratad"))]


def blkdebug_node(img, rules):
    return {"driver": "raw", "node-name": "top", "file": {
        "driver": "blkdebug", "node-name": "dbg", "inject-error": rules,
        "image": {"driver": "file", "filename": str(img)}}}


def test_blockdev_add_and_export(tmp_path, img):
    results = {}
    for name, argv0 in daemons():
        mon = Monitor(argv0, tmp_path, name)
        sock = str(tmp_path / f"{name}-nbd.sock")
        try:
            mon.ok("blockdev-add", **blkdebug_node(
                img, [{"event": "read_aio", "sector": SECTOR, "errno": 5}]))
            mon.ok("nbd-server-start",
                   addr={"type": "unix", "data": {"path": sock}})
            mon.ok("block-export-add", type="nbd", id="e0",
                   **{"node-name": "top"}, name="disk")
            # One connection a read: qemu-storage-daemon drops a client
            # whose read failed.
            results[name] = []
            for cmd in ("read 0 4k", "read 4k 4k", "read 8k 4k",
                        "read 0 8k"):
                p = run(need("qemu-io", "qemu-utils"), "-r", "-f", "raw",
                        "-c", cmd, f"nbd+unix:///disk?socket={sock}",
                        check=False)
                results[name] += drop_timing(p.stdout)
            mon.ok("block-export-del", id="e0")
            mon.ok("nbd-server-stop")
        finally:
            assert mon.stop() == 0
    assert results["stratad"] == results["qsd"]
    assert results["qsd"][1] == results["qsd"][3] == \
        "read failed: Input/output error"
    assert results["qsd"][2] == "read 4096/4096 bytes at offset 8192"


@pytest.mark.parametrize("rules", [
    "x", ["x"], [{"sector": 1}], [{"event": "read_aio", "foo": 1}],
    [{"event": "read_aio", "errno": "five"}], [{"event": "bogus"}],
    [{"event": "read_aio", "iotype": "bogus"}],
])
def test_blockdev_add_errors_as_qsd(tmp_path, img, rules):
    replies = {}
    for name, argv0 in daemons():
        mon = Monitor(argv0, tmp_path, name)
        try:
            replies[name] = mon.cmd("blockdev-add",
                                    **blkdebug_node(img, rules))
        finally:
            mon.stop()
    assert "error" in replies["qsd"], replies
    assert replies["stratad"] == replies["qsd"]


# ---- block-stream on-error with a blkdebug layer, against qsd ----

def test_stream_on_error_stop_then_resume_as_qsd(tmp_path):
    """base <- mid <- top, mid's file under blkdebug failing once at mid's
    first data cluster: block-stream with on-error=stop pauses at the
    error and completes after a resume, with the chain's content."""
    qimg = need("qemu-img", "qemu-utils")
    results = {}
    for kind in ("qsd", "stratad"):
        d = tmp_path / kind
        d.mkdir()
        names = {n: d / f"{n}.qcow2" for n in ("base", "mid", "top")}
        run(qimg, "create", "-q", "-f", "qcow2", names["base"], "4M")
        run("qemu-io", "-c", "write -P 1 0 4M", names["base"])
        run(qimg, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
            "qcow2", names["mid"])
        run("qemu-io", "-c", "write -P 2 1M 1M", names["mid"])
        run(qimg, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
            "qcow2", names["top"])
        raw = d / "orig.raw"
        run(qimg, "convert", "-O", "raw", names["top"], raw)
        host = [e for e in json.loads(run(qimg, "map", "--output=json",
                                          names["mid"]).stdout)
                if e["depth"] == 0 and e["data"]][0]["offset"]
        dmn = start(kind, d)
        dmn.ok("blockdev-add", driver="qcow2", **{"node-name": "base"},
               file={"driver": "file", "filename": str(names["base"])},
               **{"read-only": True})
        dmn.ok("blockdev-add", driver="qcow2", **{"node-name": "mid"},
               backing="base", **{"read-only": True}, file={
                   "driver": "blkdebug", "image": {
                       "driver": "file", "filename": str(names["mid"])},
                   "inject-error": [{"event": "read_aio",
                                     "sector": host // 512,
                                     "once": True}]})
        dmn.ok("blockdev-add", driver="qcow2", **{"node-name": "top"},
               backing="mid",
               file={"driver": "file", "filename": str(names["top"])})
        dmn.ok("block-stream", **{"job-id": "j1", "device": "top",
                                  "on-error": "stop"})
        evs = dmn.events_until("JOB_STATUS_CHANGE", status="paused")
        dmn.ok("block-job-resume", device="j1")
        evs += dmn.events_until("JOB_STATUS_CHANGE", status="null")
        for e in evs:
            if e["event"] != "JOB_STATUS_CHANGE":
                e["data"].pop("offset", None)
        results[kind] = evs
        assert dmn.stop() == 0
        run(qimg, "compare", "-F", "raw", names["top"], raw)
        run(qimg, "check", names["top"])
    assert results["stratad"] == results["qsd"]
    seq = statuses(results["qsd"])
    assert "BLOCK_JOB_ERROR" in seq and seq[-3:] == [
        "BLOCK_JOB_COMPLETED", "concluded", "null"]
