"""blockdev-mirror under a guest's writes, into a local qcow2 and into an
NBD export of a second stratad (the pre-copy half of a migration): a
seeded writer on an NBD export of the source writes while the job copies,
once it is READY, across the pivot and after it; afterwards the export
reads as the writer's model (it now serves the target) and the target
image compares equal to it."""
import random
import time

import pytest

from harness import run
from harness.chains import add_top, make_chain
from harness.daemons import start
from harness.qcow2 import MiB
from harness.wait import wait_until
from test_commit_active import (SIZE_MIB, Writer, assert_export_reads,
                                scattered_chain, serve_target, serve_top)


# Under a speed limit the job copies one run at a time; without one,
# several copies are in flight (copier threads) while the guest writes;
# buf-size 64 KiB allows one copy of one piece at a time.
@pytest.mark.parametrize("where,speed,mode,buf", [
    ("local", 32 * MiB, "background", None),
    ("nbd", 32 * MiB, "background", None),
    ("local", 0, "background", None),
    ("nbd", 0, "background", None),
    ("local", 0, "write-blocking", None),
    ("nbd", 0, "write-blocking", None),
    ("local", 0, "background", 64 * 1024),
])
def test_mirror_under_writes(tmp_path, qemu_img, qemu_io, where, speed, mode,
                             buf):
    rng = random.Random(11)
    p, raw, model = scattered_chain(tmp_path / "src", qemu_img, qemu_io, rng,
                                    SIZE_MIB * 2)
    dst = tmp_path / "dst.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", dst, f"{SIZE_MIB}M")

    others = []
    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    if where == "local":
        d.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
             file={"driver": "file", "filename": str(dst)})
    else:
        others.append(serve_target(tmp_path / "dst", dst, d))
    # Without a limit, a guest as fast as the export (FastWriter) lands
    # writes on runs while they are being copied.
    w = (FastWriter if speed == 0 else Writer)(
        f"nbd+unix:///top?socket={sock}", model, 11)
    w.start()
    args = {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
            "speed": speed, "copy-mode": mode}
    if buf is not None:
        args["buf-size"] = buf
    d.ok("blockdev-mirror", **args)
    pivot_and_check(d, w, sock, model, raw, dst, qemu_img,
                    others=others, export_node="tgt")


class FastWriter(Writer):
    PAUSE = 0      # as fast as the export takes them: far above the limit


@pytest.mark.parametrize("mode", ["write-blocking", "background"])
def test_write_blocking_converges(tmp_path, qemu_img, qemu_io, mode):
    """A guest that dirties far faster than the mirror's 256 KiB/s limit
    (4 pieces a second, which even a guest slowed by a loaded machine
    outruns):
    with copy-mode=write-blocking its writes reach the target before they
    return and dirty nothing, so the job reaches READY once the initial
    copy is done, and after the pivot the target reads as the guest
    wrote; in the background mode it does not (still copying, not ready,
    while the guest writes on)."""
    rng = random.Random(5)
    p = make_chain(tmp_path / "src", qemu_img, qemu_io, SIZE_MIB)
    raw = tmp_path / "view.raw"
    run(qemu_img, "convert", "-O", "raw", p["top"], raw)
    model = bytearray(raw.read_bytes())
    # sync=top: the target shares top's backing, as QEMU expects of it.
    dst = tmp_path / "dst.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", p["mid"], "-F",
        "qcow2", dst)
    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    d.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
         file={"driver": "file", "filename": str(dst)},
         backing={"driver": "qcow2", "node-name": "tgt-backing",
                  "read-only": True,
                  "file": {"driver": "file", "filename": p["mid"]}})
    w = FastWriter(f"nbd+unix:///top?socket={sock}", model, rng.random())
    w.start()
    d.ok("blockdev-mirror", **{"job-id": "m", "device": "top",
                               "target": "tgt", "sync": "top",
                               "copy-mode": mode, "speed": 256 * 1024})
    if mode == "background":
        # Writes dirty 64 KiB pieces far faster than 256 KiB/s copies them.
        start = w.count
        time.sleep(3)
        wait_until(lambda: w.count > start + 50 or w.error, timeout=60)
        [job] = d.ok("query-block-jobs")
        assert not job["ready"] and job["offset"] < job["len"], job
        assert not any(e["event"] == "BLOCK_JOB_READY"
                       for e in d.qmp.events)
        w.finish()
        d.ok("block-job-cancel", device="m", force=True)
        d.event("BLOCK_JOB_CANCELLED", timeout=30)
        assert d.stop() == 0
        return
    d.event("BLOCK_JOB_READY", timeout=60)
    d.ok("block-job-complete", device="m")
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"], e
    w.finish()
    assert d.stop() == 0
    raw.write_bytes(model)
    run(qemu_img, "check", dst)
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, dst)


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_during_mirror_then_again(tmp_path, qemu_img, qemu_io, seed):
    """stratad killed with SIGKILL while a mirror copies under a 2 MiB/s
    limit, after the guest's writes were flushed: every image checks
    clean (leaks at most), the source reads as the guest wrote, and the
    same mirror into the same target run again makes it read the same."""
    rng = random.Random(seed)
    p, raw, model = scattered_chain(tmp_path / "src", qemu_img, qemu_io, rng,
                                    SIZE_MIB * 2)
    dst = tmp_path / "dst.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", dst, f"{SIZE_MIB}M")

    def add_target(d):
        d.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
             file={"driver": "file", "filename": str(dst)})

    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    add_target(d)
    w = Writer(f"nbd+unix:///top?socket={sock}", model, seed)
    w.start()
    d.ok("blockdev-mirror", **{"job-id": "m", "device": "top",
                               "target": "tgt", "sync": "full",
                               "speed": 2 * MiB})
    time.sleep(rng.uniform(0.3, 1.5))
    w.finish()
    [job] = d.ok("query-block-jobs")
    assert not job["ready"], job
    d.kill()

    raw.write_bytes(model)
    for path in (p["base"], p["mid"], p["top"], dst):
        r = run(qemu_img, "check", path, check=False)
        assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: leaks
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, p["top"])

    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    add_target(d)
    d.ok("blockdev-mirror", **{"job-id": "m", "device": "top",
                               "target": "tgt", "sync": "full"})
    d.event("BLOCK_JOB_READY", timeout=60)
    d.ok("block-job-complete", device="m")
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"]
    assert d.stop() == 0
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, dst)


def test_replaces_other_than_the_device_is_refused(tmp_path, qemu_img,
                                                   qemu_io):
    """Not built: replaces naming another node is refused in one line and
    starts nothing (QEMU would check the node against the source's chain
    and its size, for quorum children)."""
    p = make_chain(tmp_path, qemu_img, qemu_io, SIZE_MIB)
    dst = tmp_path / "dst.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", dst, f"{SIZE_MIB}M")
    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
         file={"driver": "file", "filename": str(dst)})
    r = d.cmd("blockdev-mirror", **{"job-id": "m", "device": "top",
                                    "target": "tgt", "sync": "full",
                                    "replaces": "tgt"})
    assert r["error"] == {"class": "GenericError", "desc":
                          "replaces='tgt' other than the device is not "
                          "supported"}
    assert d.ok("query-block-jobs") == []
    r = d.cmd("blockdev-mirror", **{"job-id": "m", "device": "top",
                                    "target": "tgt", "sync": "full",
                                    "replaces": "top"})
    assert "return" in r, r
    d.event("BLOCK_JOB_READY", timeout=60)
    d.ok("block-job-cancel", device="m")
    d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert d.stop() == 0


@pytest.mark.parametrize("sync,mode", [("full", "background"),
                                       ("top", "background"),
                                       ("top", "write-blocking"),
                                       ("none", "background"),
                                       ("none", "write-blocking")])
def test_drive_mirror_under_writes(tmp_path, qemu_img, qemu_io, sync, mode):
    """drive-mirror makes the target (sync=top: backed by mid, none: by
    top) while a seeded guest writes; after the pivot the export reads as
    the guest wrote, through the backing edge the pivot made, and so does
    the new file with the chain its header names."""
    rng = random.Random(13)
    p, raw, model = scattered_chain(tmp_path / "src", qemu_img, qemu_io, rng,
                                    SIZE_MIB * 2)
    dst = tmp_path / "src" / "dst.qcow2"
    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    w = Writer(f"nbd+unix:///top?socket={sock}", model, 13)
    w.start()
    d.ok("drive-mirror", **{"job-id": "m", "device": "top",
                            "target": str(dst), "sync": sync,
                            "copy-mode": mode, "speed": 32 * MiB})
    pivot_and_check(d, w, sock, model, raw, dst, qemu_img)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_drive_mirror_into_big_clusters(tmp_path, qemu_img, qemu_io, mode):
    """mode=existing, sync=top, into a qcow2 with 256 KiB clusters backed
    by mid: the job opens it without its backing until the pivot, so a
    64 KiB copy (or guest write) into an empty cluster would leave the rest
    of that cluster reading zeros where mid holds data.  The job copies
    whole target clusters, as QEMU rounds to them (no speed limit: each
    guest write dirties 256 KiB, faster than 32 MiB/s copies them)."""
    rng = random.Random(17)
    p, raw, model = scattered_chain(tmp_path / "src", qemu_img, qemu_io, rng,
                                    SIZE_MIB * 2)
    dst = tmp_path / "src" / "dst.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=256k",
        "-b", p["mid"], "-F", "qcow2", dst)
    d, sock = serve_top(tmp_path / "src", p["top"], tmp_path / "n.sock")
    w = Writer(f"nbd+unix:///top?socket={sock}", model, 17)
    w.start()
    d.ok("drive-mirror", **{"job-id": "m", "device": "top",
                            "target": str(dst), "sync": "top",
                            "mode": "existing", "format": "qcow2",
                            "copy-mode": mode})
    pivot_and_check(d, w, sock, model, raw, dst, qemu_img)


def pivot_and_check(d, w, sock, model, raw, dst, qemu_img, others=(),
                    export_node=None):
    """READY, pivot while the guest W writes on; the export (on
    EXPORT_NODE, when given) and DST (with its chain) read as MODEL.  D
    and the daemons OTHERS stop cleanly."""
    d.event("BLOCK_JOB_READY", timeout=60)
    before = w.count
    time.sleep(0.3)
    d.ok("block-job-complete", device="m")
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"], e
    time.sleep(0.3)
    w.finish()
    assert w.count > before           # the guest wrote on after READY
    if export_node:
        assert [x["node-name"] for x in d.ok("query-block-exports")] == [
            export_node]
    assert_export_reads(sock, model)
    for dm in (d, *others):
        assert dm.stop() == 0
    raw.write_bytes(model)
    run(qemu_img, "check", dst)
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, dst)
