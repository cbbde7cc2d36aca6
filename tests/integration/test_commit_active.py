"""Active block-commit under a guest's writes: a seeded writer on an NBD
export of top writes all through the job, while it copies, once it is
READY, across the pivot and after it.  Every write is kept in a model of
the disk; afterwards the export reads as the model (it now serves base),
base reads as the model under qemu-img compare, and every image passes
qemu-img check.  The same with a cancel after READY (no pivot): the export
still serves top, and base is a copy of top as it was at the cancel."""
import os
import random
import threading
import time

import pytest

from harness import run
from harness.chains import add_top, make_chain
from harness.daemons import nbd_handle, start
from harness.qcow2 import MiB

SIZE_MIB = 32
SEED = int(os.environ.get("STRATA_SEED", "7"))


class Writer(threading.Thread):
    """4 KiB writes at seeded random places, one every PAUSE seconds at
    most, until stopped; MODEL follows every write that returned.  Each
    dirties a 64 KiB piece: at 200 a second that is 12.5 MiB/s, which a
    background commit at 32 MiB/s outruns (a faster guest would keep it
    from READY, as it would QEMU's)."""

    PAUSE = 0.005

    def __init__(self, uri, model, seed):
        super().__init__(daemon=True)
        self.nbd, self.h = nbd_handle(uri)
        self.model, self.rng = model, random.Random(seed)
        self.stop_now = threading.Event()
        self.count = 0
        self.error = None

    def run(self):
        try:
            while not self.stop_now.is_set():
                off = self.rng.randrange(SIZE_MIB * MiB // 4096) * 4096
                data = bytes([self.rng.randrange(1, 256)]) * 4096
                self.h.pwrite(data, off)
                self.model[off:off + 4096] = data
                self.count += 1
                time.sleep(self.PAUSE)
        except Exception as e:  # reported by the test
            self.error = e

    def finish(self):
        self.stop_now.set()
        self.join(30)
        assert self.error is None, self.error
        self.h.flush()


def assert_export_reads(sock, model):
    """The export "top" on SOCK reads as MODEL, the guest's view."""
    nbd, h = nbd_handle(f"nbd+unix:///top?socket={sock}")
    got = bytearray()
    for off in range(0, SIZE_MIB * MiB, 4 * MiB):
        got += h.pread(4 * MiB, off)
    h.shutdown()
    assert got == model, "the export does not read as the guest wrote"


def serve_top(where, top, sock):
    """A stratad in WHERE with TOP open as node "top", exported writable
    over NBD on the unix socket SOCK; returns the daemon and SOCK."""
    d = start("stratad", where)
    add_top(d, top)
    d.ok("nbd-server-start", addr={"type": "unix",
                                   "data": {"path": str(sock)}})
    d.ok("block-export-add", type="nbd", id="e", **{"node-name": "top"},
         writable=True)
    return d, sock


def serve_target(where, dst, d):
    """A second stratad in WHERE serving the qcow2 DST writable over NBD
    (the destination host), added to the daemon D as node "tgt"; returns
    the second daemon."""
    where.mkdir()
    b = start("stratad", where)
    b.ok("blockdev-add", driver="qcow2", **{"node-name": "dst"},
         file={"driver": "file", "filename": str(dst)})
    bsock = where / "b.sock"
    b.ok("nbd-server-start", addr={"type": "unix",
                                   "data": {"path": str(bsock)}})
    b.ok("block-export-add", type="nbd", id="d", **{"node-name": "dst"},
         writable=True)
    d.ok("blockdev-add", driver="nbd", **{"node-name": "tgt"},
         server={"type": "unix", "path": str(bsock)}, export="dst")
    return b


def scattered_chain(where, qemu_img, qemu_io, rng, n):
    """make_chain in WHERE with N of top's 64 KiB clusters written at
    random; returns the paths, view.raw beside them, and the guest's view
    as a bytearray the writers keep up to date."""
    p = make_chain(where, qemu_img, qemu_io, SIZE_MIB)
    cmds = []
    for i in rng.sample(range(SIZE_MIB * 16), n):
        cmds += ["-c", f"write -P {0x40 + i % 64} {i * 65536} 64k"]
    run(qemu_io, "-f", "qcow2", *cmds, p["top"])
    raw = where / "view.raw"
    run(qemu_img, "convert", "-O", "raw", p["top"], raw)
    return p, raw, bytearray(raw.read_bytes())


@pytest.mark.parametrize("end", ["complete", "cancel"])
def test_active_commit_under_writes(tmp_path, qemu_img, qemu_io, end):
    rng = random.Random(SEED)
    p, raw, model = scattered_chain(tmp_path, qemu_img, qemu_io, rng,
                                    SIZE_MIB * 2)   # an eighth of top

    d, sock = serve_top(tmp_path, p["top"], tmp_path / "n.sock")
    w = Writer(f"nbd+unix:///top?socket={sock}", model, SEED)
    w.start()
    d.ok("block-commit", **{"job-id": "j", "device": "top",
                            "speed": 32 * MiB})
    d.event("BLOCK_JOB_READY", timeout=60)
    before_end = w.count
    time.sleep(0.3)
    d.ok("block-job-complete" if end == "complete" else "block-job-cancel",
         device="j")
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"]
    time.sleep(0.3)
    w.finish()
    assert w.count > before_end       # the guest wrote on after READY
    [exp] = d.ok("query-block-exports")
    # The export serves base after a pivot, top after a cancel.
    want = "top" if end == "cancel" else [
        n["node-name"] for n in d.ok("query-named-block-nodes", flat=True)
        if n["drv"] == "qcow2" and n["file"] == p["base"]][0]
    assert exp["node-name"] == want

    assert_export_reads(sock, model)
    assert d.stop() == 0

    raw.write_bytes(model)
    for n in ("base", "mid", "top"):
        run(qemu_img, "check", p[n])
    if end == "complete":
        run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, p["base"])
    else:
        run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, p["top"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_during_active_commit_then_again(tmp_path, qemu_img, qemu_io,
                                              seed):
    """stratad killed with SIGKILL while an active commit copies (or, for
    seed 3, waits READY) after the guest's writes were flushed: every image
    checks clean (leaks at most), top reads as the guest wrote, and the same
    commit run again pivots onto a base that reads the same."""
    rng = random.Random(seed)
    p, raw, model = scattered_chain(tmp_path, qemu_img, qemu_io, rng,
                                    SIZE_MIB * 4)

    d, sock = serve_top(tmp_path, p["top"], tmp_path / "n.sock")
    w = Writer(f"nbd+unix:///top?socket={sock}", model, seed)
    w.start()
    ready = seed == 3
    d.ok("block-commit", **{"job-id": "j", "device": "top",
                            "speed": 0 if ready else 2 * MiB})
    if ready:
        d.event("BLOCK_JOB_READY", timeout=60)
    time.sleep(rng.uniform(0.2, 1.0))
    w.finish()                      # every write returned and flushed
    if not ready:
        [job] = d.ok("query-block-jobs")
        assert not job["ready"], job  # still copying when killed
    d.kill()

    raw.write_bytes(model)
    for n in ("base", "mid", "top"):
        r = run(qemu_img, "check", p[n], check=False)
        assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: leaks
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, p["top"])

    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("block-commit", **{"job-id": "j", "device": "top"})
    d.event("BLOCK_JOB_READY", timeout=60)
    d.ok("block-job-complete", device="j")
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"]
    assert d.stop() == 0
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, p["base"])
    run(qemu_img, "check", p["base"])
