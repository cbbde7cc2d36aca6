"""Fault sweep: fail the Nth write of an operation, for every N.

blkdebug's countdown rule (inject-error.N.countdown=K, see the top of
src/drivers/blkdebug.c) lets K-1 writes through and fails the Kth, as
SQLite's fault injector does.  Each test runs one operation again and
again on a fresh copy of the same image with K = 1, 2, ... until the
operation completes without reaching its Kth write, and checks at every K:

- the failure is reported (strata-io exits 1 and prints the failed
  command; a stream job ends with an error in BLOCK_JOB_COMPLETED);
- qemu-img check finds no corruption (leaked clusters are allowed: an
  error can only leak, as a crash can);
- what was acknowledged reads back: every write strata-io reported done
  and a later flush made durable, the data that was there before, and
  the guest view of a chain a stream copied into.

Once the operation succeeds it must keep succeeding for the next K: a
success followed by a failure would mean an error was swallowed.  Images
are small (512-byte and 4 KiB clusters, so L2 tables and refcount blocks
are allocated within a few hundred KiB) and K is bounded.
"""
import shutil

import pytest

from harness import binary, drop_timing, make_image, run
from harness.daemons import start
from harness.qcow2 import KiB, create, qemu_img, qemu_io, qio

MAX_K = 150          # more writes than either operation issues
SETTLE = 3           # successes in a row that end a sweep

# Allocating writes into unallocated clusters with 512-byte clusters: new
# data clusters, new L2 tables (each maps 32 KiB), a second refcount block
# (each counts 128 KiB of the file), with flushes between them.
WRITES = [("write", 0x22, 64 * KiB, 12 * KiB),
          ("write", 0x33, 512 * KiB, 64 * KiB),
          ("flush",),
          ("write", 0x44, 20 * KiB, 8 * KiB),
          ("write", 0x55, 900 * KiB, 100 * KiB),
          ("flush",)]
OLD = (0x01, 0, 8 * KiB)             # written before the sweep
UNTOUCHED = (200 * KiB, 64 * KiB)    # never written: reads as zeroes


@pytest.mark.parametrize("once,expect", [
    ("on", ["wrote", "wrote", "write failed", "wrote", "wrote"]),
    ("off", ["wrote", "wrote", "write failed", "write failed",
             "write failed"]),
])
def test_countdown_rule(tmp_path, once, expect):
    """countdown=3 passes two writes and fails the third; reads are not
    counted; once=on fails the third alone, once=off every one after."""
    img = make_image(tmp_path / "r.raw", size=64 * KiB)
    cmds = []
    for i in range(5):
        cmds += ["-c", "read 0 4k", "-c", f"write {i * 4}k 4k"]
    p = run(binary("strata-io"), "-f", "raw", "-o",
            "file.driver=blkdebug,file.inject-error.0.iotype=write,"
            f"file.inject-error.0.countdown=3,file.inject-error.0.once={once}",
            *cmds, img, check=False)
    lines = drop_timing(p.stdout)
    assert [x.split(" ")[0] for x in lines[0::2]] == ["read"] * 5, lines
    assert [x.split(" ")[0] if x.startswith("wrote") else x[:12]
            for x in lines[1::2]] == expect, lines
    assert p.returncode == 1
    p = run(binary("strata-io"), "-f", "raw", "-o",
            "file.driver=blkdebug,file.inject-error.0.iotype=write,"
            "file.inject-error.0.countdown=-1", "-c", "read 0 512", img,
            check=False)
    assert p.returncode == 1
    assert "inject-error.0.countdown: expected an integer from 0" in p.stderr


def sweep(attempt):
    """ATTEMPT(k) -> True when the operation succeeded, for k = 1, 2, ...
    until SETTLE successes in a row; returns how many k failed."""
    failures, first_success = 0, None
    for k in range(1, MAX_K + 1):
        if attempt(k):
            first_success = first_success or k
            if k - first_success + 1 == SETTLE:
                return failures
        else:
            assert first_success is None, (
                f"k={k} failed after k={first_success} succeeded: an "
                "injected error was swallowed")
            failures += 1
    raise AssertionError(f"still failing at k={MAX_K}")


def qemu_img_check(path, where):
    p = run(qemu_img(), "check", path, check=False)
    # 0: clean; 3: leaked clusters only.
    assert p.returncode in (0, 3), f"{where}: {p.stdout}{p.stderr}"


def outcome(stdout):
    """[(command, ok)] from strata-io's output for WRITES, in order: a
    write prints "wrote ..." or "write failed: ...", a flush prints
    nothing unless it failed."""
    lines = drop_timing(stdout)
    out = []
    for op in WRITES:
        if op[0] == "write":
            line = lines.pop(0)
            assert line.startswith(("wrote ", "write failed: ")), line
            out.append((op, line.startswith("wrote ")))
        else:
            failed = bool(lines) and lines[0].startswith("flush failed: ")
            if failed:
                lines.pop(0)
            out.append((op, not failed))
    assert not lines, lines
    return out


@pytest.mark.parametrize("once", ["on", "off"])
def test_allocating_write(tmp_path, once):
    """strata-io writes into unallocated clusters of a qcow2 image whose
    file is under blkdebug; the Kth write to the file fails (only that one
    with once=on, every one from it on with once=off)."""
    pristine = tmp_path / "pristine.qcow2"
    create(pristine, 1024 * KiB, cluster_size=512)
    qio(pristine, [f"write -q -P {OLD[0]} {OLD[1]} {OLD[2]}"])
    img = tmp_path / "img.qcow2"
    cmds = []
    for op in WRITES:
        cmds += ["-c", (f"write -P {op[1]} {op[2]} {op[3]}"
                        if op[0] == "write" else "flush")]

    def attempt(k):
        shutil.copy(pristine, img)
        rule = ("file.driver=blkdebug,file.inject-error.0.iotype=write,"
                f"file.inject-error.0.countdown={k},"
                f"file.inject-error.0.once={once}")
        p = run(binary("strata-io"), "-f", "qcow2", "-o", rule, *cmds, img,
                check=False)
        where = f"once={once} k={k}"
        results = outcome(p.stdout)
        failed = not all(ok for _, ok in results)
        # Reported: a failed command makes strata-io exit 1, and the
        # message names the injected error.
        assert p.returncode == (1 if failed else 0), (where, p.stdout,
                                                      p.stderr)
        if failed:
            assert "injected write error" in p.stdout + p.stderr, where
        qemu_img_check(img, where)
        # Durable: a write acknowledged before a flush that succeeded.
        reads, acked = [], []
        for op, ok in results:
            if op[0] == "write" and ok:
                acked.append(op)
            elif op[0] == "flush" and ok:
                reads += [f"read -q -P {o[1]} {o[2]} {o[3]}" for o in acked]
                acked = []
        reads += [f"read -q -P {OLD[0]} {OLD[1]} {OLD[2]}",
                  f"read -q -P 0 {UNTOUCHED[0]} {UNTOUCHED[1]}"]
        r = run(qemu_io(), "-f", "qcow2", "-r",
                *sum((["-c", c] for c in reads), []), img, check=False)
        assert r.returncode == 0 and not r.stdout, (where, r.stdout,
                                                     r.stderr)
        return not failed

    assert sweep(attempt) > 10   # the sweep did reach the metadata


def test_stream(tmp_path):
    """stratad block-stream of base <- mid <- top into top, top's file
    under blkdebug: the Kth write to it (a copied cluster, an L2 or
    refcount update, the header that drops the backing file) fails once.
    The job must end with an error, and top must still read as the chain
    did."""
    src = tmp_path / "src"
    src.mkdir()
    base, mid, top = (src / f"{n}.qcow2" for n in ("base", "mid", "top"))
    create(base, 512 * KiB, cluster_size=4096)
    qio(base, ["write -q -P 1 0 64k", "write -q -P 2 256k 32k"])
    create(mid, 512 * KiB, backing="base.qcow2", cluster_size=4096)
    qio(mid, ["write -q -P 3 48k 32k", "write -q -z 264k 8k"])
    create(top, 512 * KiB, backing="mid.qcow2", cluster_size=512)
    qio(top, ["write -q -P 4 400k 4k"])
    raw = tmp_path / "chain.raw"
    run(qemu_img(), "convert", "-O", "raw", top, raw)

    def attempt(k):
        work = tmp_path / f"k{k}"
        shutil.copytree(src, work)
        d = start("stratad", work)
        for name, backing in (("base", None), ("mid", "base")):
            d.ok("blockdev-add", driver="qcow2", **{"node-name": name},
                 file={"driver": "file",
                       "filename": str(work / f"{name}.qcow2")},
                 **({"backing": backing} if backing else {}))
        d.ok("blockdev-add", driver="qcow2", **{"node-name": "top"},
             backing="mid", file={
                 "driver": "blkdebug",
                 "image": {"driver": "file",
                           "filename": str(work / "top.qcow2")},
                 "inject-error": [{"event": "write_aio", "countdown": k,
                                   "once": True}]})
        d.ok("block-stream", **{"job-id": "j", "device": "top"})
        e = d.event("BLOCK_JOB_COMPLETED", timeout=30)
        assert d.stop() == 0
        where = f"k={k}: {e['data']}"
        failed = "error" in e["data"]
        if failed:
            assert "Input/output error" in e["data"]["error"], where
        qemu_img_check(work / "top.qcow2", where)
        # The guest view never changes, whether the stream failed or not.
        run(qemu_img(), "compare", "-F", "raw", work / "top.qcow2", raw)
        info = run(qemu_img(), "info", work / "top.qcow2").stdout
        assert ("backing file:" in info) == failed, (where, info)
        shutil.rmtree(work)
        return not failed

    assert sweep(attempt) > 3
