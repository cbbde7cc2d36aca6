"""A crash at any point leaves a qcow2 image QEMU calls consistent.

An LD_PRELOAD shim (qcow2_crash_shim.c) stops strata-io before its Nth
write or flush of the image, keeping every earlier write, losing all those
not yet flushed, a random subset of them, or all but the latest (as a
power failure with a reordering disk cache may).  For every N, 'qemu-img check'
must find no corruption (leaked clusters are allowed: DESIGN.md promises
a crash can only leak) and qemu-io must read the whole image without an
error, with the data the workload never touched intact.  Runs under ASan
too, where the shim is loaded after the runtime.
"""
import shutil

import pytest

from harness import binary, need, run
from harness.crash import build_shim, crash_at, crash_env
from harness.qcow2 import KiB, MiB, create, header, qio

@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return build_shim(tmp_path_factory.mktemp("shim"))


WORKLOADS = {
    # cluster size, options, commands
    "alloc-512": (512, {}, ["write -P 0x11 1000 70000", "write -z -u 0 4096",
                            "discard 16384 8192",
                            "write -P 0x12 300000 2000"]),
    # 64-bit refcounts: one refcount table cluster covers only 2 MiB.
    "grow-reftable": (512, {"refcount_bits": 64},
                      ["write -P 0x21 1900k 700k"]),
    "grow-l1": (512, {}, ["truncate 12M", "write -P 0x41 11M 4k"]),
    "ext-l2": (32 * KiB, {"extended_l2": "on"},
               ["write -P 0x31 5000 3000", "write -z 100k 64k",
                "write -z -u 200k 40k", "discard 0 64k"]),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_crash_points(tmp_path, shim, name):
    cs, opts, cmds = WORKLOADS[name]
    orig = tmp_path / "orig.qcow2"
    base = tmp_path / "base.qcow2"
    create(base, 8 * MiB, cluster_size=64 * KiB)
    qio(base, ["write -q -P 0xb1 0 8M"])
    create(orig, 8 * MiB, backing="base.qcow2", cluster_size=cs, **opts)
    qio(orig, ["write -q -P 0x01 0 64k", "write -q -P 0x02 2M 64k",
               "write -q -P 0x03 6M 64k"]
        + (["write -q -P 0x03 64k 1700k"] if name == "grow-reftable" else []))
    img = tmp_path / "img.qcow2"
    shutil.copy(orig, img)
    count = tmp_path / "count"
    args = []
    for c in cmds:
        args += ["-c", c]
    run(binary("strata-io"), "-f", "qcow2", *args, img,
        env=crash_env(shim, img, CRASH_COUNT=count))
    total, *hdr = map(int, count.read_text().split())
    assert total > 3
    if name == "grow-reftable":
        assert header(img)["refcount_table_offset"] != \
            header(orig)["refcount_table_offset"]
    points = set(range(1, total + 1))
    if total > 40:
        # Sample evenly, plus every step around a header update (the
        # refcount table move), always including the last write.
        points = set(range(1, total + 1, total // 10)) | {total}
        for h in hdr:
            points |= set(range(max(1, h - 4), min(total, h + 6) + 1))
    points = sorted(points)
    for n in points:
        for lose in (0, 1, 2, 3):
            crash_at(shim, orig, img, args, n, lose, total)
            # Everything reads, and what the workload never touched is
            # intact: the image's own data and the backing file's.
            r = run(need("qemu-io", "qemu-utils"), "-f", "qcow2",
                    "-c", "read -q 0 8M", "-c", "read -q -P 0x03 6M 64k",
                    "-c", "read -q -P 0xb1 7M 64k", img, check=False)
            assert r.returncode == 0 and "failed" not in r.stdout, (
                f"crash before event {n}/{total} (lose unflushed={lose}):\n"
                f"{r.stdout}")


def test_crash_keeps_flushed_writes(tmp_path, shim):
    """Allocating writes leave their refcounts and L2 entries dirty in the
    metadata cache until a flush: a crash at any point after a flush must
    still find every write made before it (and leak at worst)."""
    orig = tmp_path / "orig.qcow2"
    create(orig, 8 * MiB, cluster_size=64 * KiB)
    cmds = ["write -P 0x61 0 4k", "write -P 0x62 1M 4k", "flush",
            "write -P 0x63 2M 4k", "write -P 0x64 4k 4k",   # in place
            "write -P 0x65 7M 64k", "flush", "write -P 0x66 5M 4k"]
    checks = [["read -q -P 0x61 0 4k", "read -q -P 0x62 1M 4k"],
              ["read -q -P 0x63 2M 4k", "read -q -P 0x64 4k 4k",
               "read -q -P 0x65 7M 64k"]]
    img = tmp_path / "img.qcow2"

    def events(n_cmds):
        shutil.copy(orig, img)
        count = tmp_path / "count"
        run(binary("strata-io"), "-f", "qcow2", *sum((["-c", c] for c in
                                               cmds[:n_cmds]), []),
            img, env=crash_env(shim, img, CRASH_COUNT=count))
        return int(count.read_text().split()[0])

    # Events up to each flush (a prefix run also counts its close, so
    # these are upper bounds: a crash past one means the flush was done).
    marks = [events(3), events(7)]
    total = events(len(cmds))
    args = sum((["-c", c] for c in cmds), [])
    for n in range(1, total + 1):
        for lose in (0, 1, 2, 3):
            crash_at(shim, orig, img, args, n, lose, total)
            want = [r for m, rs in zip(marks, checks) if n > m for r in rs]
            r = run(need("qemu-io", "qemu-utils"), "-f", "qcow2",
                    *sum((["-c", c] for c in ["read -q 0 8M"] + want), []),
                    img, check=False)
            assert r.returncode == 0 and "fail" not in r.stdout, (
                f"crash before event {n}/{total} (lose={lose}): flushed "
                f"data lost:\n{r.stdout}")
