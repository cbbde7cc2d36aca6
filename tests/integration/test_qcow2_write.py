"""strata-io writes qcow2 images that QEMU then accepts.

After strata-io writes (patterns, partial clusters over backing files,
zero writes with and without unmap, discards), 'qemu-img check' must find
no corruption and no leaks, and qemu-io must read back what a model of
the guest says.  A seeded random test applies the same operations with
qemu-io to one copy and strata-io to another and asks 'qemu-img compare'.
"""
import json
import os
import random
import shutil

import pytest

from harness import run
from harness.qcow2 import (KiB, MiB, Model, check_reads, create, qemu_check,
                           qemu_img, qio, sio)

LAYOUTS = [
    (512, "1.1", "off"),
    (4 * KiB, "1.1", "off"),
    (64 * KiB, "1.1", "off"),
    (4 * KiB, "0.10", "off"),
    (64 * KiB, "1.1", "on"),
]
IDS = [f"{c}-{v}-l2ext{e}" for c, v, e in LAYOUTS]


def opts(cs, compat, ext):
    o = dict(cluster_size=cs, compat=compat)
    if ext == "on":
        o["extended_l2"] = "on"
    return o


def write_ops(m, cs, unmap_discard_zero=True):
    ops = [
        m.write(cs // 2, 3 * cs, 0x11),
        m.write(1000, 5000, 0x22),
        m.zero(5 * cs, 2 * cs),
        m.zero(7 * cs + 100, 3 * cs),
        m.write(12 * cs, 2 * cs, 0x44),
        m.zero(12 * cs, cs, unmap=True),
        m.write(16 * cs, 3 * cs, 0x55),
        m.write(16 * cs + 10, 20, 0x56),
    ]
    return ops


@pytest.mark.parametrize("cs,compat,ext", LAYOUTS, ids=IDS)
def test_write_then_qemu_checks(tmp_path, cs, compat, ext):
    size = max(24 * cs, 2 * MiB)
    img = tmp_path / "w.qcow2"
    create(img, size, **opts(cs, compat, ext))
    m = Model(size)
    ops = write_ops(m, cs)
    ops.append(f"discard {16 * cs} {cs}")
    m.data[16 * cs:17 * cs] = bytes(cs)
    sio(img, ops)
    qemu_check(img)
    check_reads(qio, img, m)
    check_reads(sio, img, m)
    # A second session rewrites what the first allocated.
    sio(img, [m.write(0, 20 * cs, 0x66), m.zero(2 * cs, cs, unmap=True)])
    qemu_check(img)
    check_reads(qio, img, m)


@pytest.mark.parametrize("cs,compat,ext", LAYOUTS, ids=IDS)
def test_partial_writes_over_backing(tmp_path, cs, compat, ext):
    size = max(24 * cs, 2 * MiB)
    base = tmp_path / "base.qcow2"
    create(base, size, cluster_size=64 * KiB)
    bm = Model(size)
    qio(base, [bm.write(0, size, 0xba), bm.zero(3 * cs, cs)])
    top = tmp_path / "top.qcow2"
    create(top, size, backing="base.qcow2", **opts(cs, compat, ext))
    m = Model(size, bm)
    ops = [m.write(100, 10, 0x01), m.write(cs - 1, 2, 0x02),
           m.write(3 * cs + 7, 9, 0x03), m.zero(6 * cs + 1, 5)]
    if compat != "0.10":
        ops += [m.zero(8 * cs, 2 * cs), m.zero(10 * cs, cs, unmap=True)]
    sio(top, ops)
    qemu_check(top)
    check_reads(qio, top, m)
    check_reads(sio, top, m)
    assert run(qemu_img(), "info", base).returncode == 0
    qemu_check(base)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_cow_of_compressed_clusters(tmp_path, ctype):
    cs = 64 * KiB
    size = 1 * MiB
    m = Model(size)
    m.write(0, size, 0x3c)
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(m.data))
    img = tmp_path / "c.qcow2"
    run(qemu_img(), "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
        f"compression_type={ctype}", raw, img)
    sio(img, [m.write(cs + 5, 10, 0x01), m.zero(3 * cs, cs),
              m.zero(4 * cs, cs, unmap=True), "discard 327680 65536"])
    m.data[5 * cs:6 * cs] = bytes(cs)
    qemu_check(img)
    check_reads(qio, img, m)


def test_refcount_table_grows(tmp_path):
    """512-byte clusters: 20 MiB needs many refcount blocks and a bigger
    refcount table than qemu-img created."""
    img = tmp_path / "g.qcow2"
    create(img, 32 * MiB, cluster_size=512)
    m = Model(32 * MiB)
    sio(img, [m.write(0, 20 * MiB, 0x42), "discard 1M 1M",
              m.write(25 * MiB, 64 * KiB, 0x43)])
    m.data[1 * MiB:2 * MiB] = bytes(MiB)
    qemu_check(img)
    check_reads(qio, img, m)


def random_ops(rng, m, cs, v3):
    ops = []
    for _ in range(rng.randint(15, 30)):
        kind = rng.random()
        off = rng.randrange(0, m.size)
        n = rng.randint(1, min(4 * cs, m.size - off))
        if kind < 0.55:
            ops.append(m.write(off, n, rng.randint(1, 255)))
        elif kind < 0.85:
            ops.append(m.zero(off, n, unmap=rng.random() < 0.5 and v3))
        else:
            # Discard: only whole clusters change; the result is checked by
            # qemu-img compare against QEMU, not against the model.
            off, n = off - off % cs, max(cs, n - n % cs)
            n = min(n, m.size - off)
            ops.append(f"discard {off} {n}")
    return ops


SEEDS = ([int(os.environ["STRATA_SEED"])] if os.environ.get("STRATA_SEED")
         else [1, 2, 3, 4])


@pytest.mark.parametrize("seed", SEEDS)
def test_random_equivalence(tmp_path, seed):
    rng = random.Random(seed)
    cs, compat, ext = rng.choice(
        [(4 * KiB, "1.1", "off"), (64 * KiB, "1.1", "off"),
         (4 * KiB, "0.10", "off"), (32 * KiB, "1.1", "on")])
    size = 32 * cs
    msg = f"STRATA_SEED={seed} (cluster {cs}, compat {compat}, l2ext {ext})"
    base = tmp_path / "base.qcow2"
    create(base, size, cluster_size=cs)
    bm = Model(size)
    qio(base, [bm.write(0, size // 2, 0xbb), bm.write(size - cs, cs, 0xbc)])
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, size, backing="base.qcow2", **opts(cs, compat, ext))
    m = Model(size, bm)
    if rng.random() < 0.4:
        # Some data first, then an internal snapshot that shares it.
        qio(a, random_ops(rng, m, cs, compat != "0.10"))
        run(qemu_img(), "snapshot", "-c", "s1", a)
        msg += " with a snapshot"
    shutil.copy(a, b)
    ops = random_ops(rng, m, cs, compat != "0.10")
    pa, pb = qio(a, ops, check=False), sio(b, ops, check=False)
    assert pa.returncode == 0 and pb.returncode == 0, (
        f"{msg}\n{ops}\n{pa.stdout}{pa.stderr}\n{pb.stdout}{pb.stderr}")
    p = run(qemu_img(), "compare", "-f", "qcow2", "-F", "qcow2", a, b,
            check=False)
    assert p.returncode == 0, f"{msg}: images differ\n{ops}\n{p.stdout}"
    for img in (a, b):
        c = run(qemu_img(), "check", img, check=False)
        assert c.returncode == 0, f"{msg}: {img}\n{c.stdout}"


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB])
def test_write_keeps_internal_snapshot(tmp_path, cs):
    """Shared L2 tables and clusters are copied, never changed in place:
    the snapshot still reads its data, and refcounts stay exact (no leaks
    after the snapshot is deleted)."""
    size = 2 * MiB
    img = tmp_path / "s.qcow2"
    create(img, size, cluster_size=cs)
    snap = Model(size)
    qio(img, [snap.write(0, 300 * KiB, 0x11),
              snap.write(1 * MiB, 2 * cs, 0x12)])
    run(qemu_img(), "snapshot", "-c", "s1", img)
    m = Model(size, snap)
    sio(img, [m.write(1000, 10 * KiB, 0x22), m.zero(20 * KiB, 2 * cs),
              m.zero(1 * MiB, cs, unmap=True), m.write(600 * KiB, cs, 0x33)])
    qemu_check(img)
    check_reads(qio, img, m)
    run(qemu_img(), "snapshot", "-c", "s2", img)
    run(qemu_img(), "snapshot", "-a", "s1", img)
    check_reads(qio, img, snap)
    run(qemu_img(), "snapshot", "-d", "s1", img)
    run(qemu_img(), "snapshot", "-a", "s2", img)
    run(qemu_img(), "snapshot", "-d", "s2", img)
    check_reads(qio, img, m)
    qemu_check(img)


@pytest.mark.parametrize("cs,compat", [(512, "1.1"), (64 * KiB, "1.1"),
                                       (4 * KiB, "0.10")])
def test_grow(tmp_path, cs, compat):
    """strata-io 'truncate' grows like qemu-io's: a longer backing file
    does not show through, the L1 table grows when it must."""
    # QEMU cannot zero the new area of a version 2 image over a longer
    # backing file (no zero flag), so give that one a short backing file.
    bsize = 8 * MiB if compat == "1.1" else 1 * MiB
    base = tmp_path / "base.qcow2"
    create(base, bsize, cluster_size=64 * KiB)
    qio(base, [f"write -q -P 0xba 0 {bsize}"])
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    old = 1 * MiB + 1536
    create(a, old, backing="base.qcow2", cluster_size=cs, compat=compat)
    qio(a, ["write -q -P 0x11 0 1000", f"write -q -P 0x12 {old - 700} 700"])
    shutil.copy(a, b)
    ops = ["truncate 6M", "write -q -P 0x13 5M 4096", "truncate 40M",
           "write -q -P 0x14 39M 512"]
    qio(a, ops)
    sio(b, ops)
    info = json.loads(run(qemu_img(), "info", "--output=json", b).stdout)
    assert info["virtual-size"] == 40 * MiB
    p = run(qemu_img(), "compare", "-f", "qcow2", "-F", "qcow2", a, b,
            check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    qemu_check(b)
    m = Model(40 * MiB, None)
    m.data[:bsize] = b"\xba" * bsize
    m.write(0, 1000, 0x11)
    m.write(old - 700, 700, 0x12)
    m.data[old:] = bytes(40 * MiB - old)
    m.write(5 * MiB, 4096, 0x13)
    m.write(39 * MiB, 512, 0x14)
    check_reads(sio, b, m)
    # Shrinking works as qemu-io's truncate does (docs/snapshots.md).
    qio(a, ["truncate 1M"])
    sio(b, ["truncate 1M"])
    p = run(qemu_img(), "compare", "-f", "qcow2", "-F", "qcow2", a, b,
            check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    qemu_check(b)
    check_reads(sio, b, Model(1 * MiB, m))
