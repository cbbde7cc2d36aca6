"""L2 table slices in the qcow2 metadata cache (l2-cache-entry-size).

The option is checked as QEMU 7.2 checks it (a power of two from 512 bytes
to the cluster size), with qemu-img's message.  With the smallest slices
and a cache of a few of them, random writes, zero writes and L2 tables
shared with internal snapshots on a backing chain must give what qemu-io
gives for the same operations: every byte read back by qemu-io, qemu-img
compare against a twin QEMU wrote, and qemu-img check clean.
"""
import os
import random

import pytest

from harness import binary, run
from harness.qcow2 import (KiB, MiB, Model, check_reads, create, qemu_check,
                           qemu_img, qio, sio)

SIZE = 64 * MiB


@pytest.mark.parametrize("cs", [512, 4 * KiB, 64 * KiB])
@pytest.mark.parametrize("entry", ["256", "512", "1000", "4k", "64k", "128k",
                                   "0"])
def test_entry_size_checked_as_qemu_img(tmp_path, cs, entry):
    img = tmp_path / "a.qcow2"
    create(img, MiB, cluster_size=cs)
    spec = f"driver=qcow2,file.filename={img},l2-cache-entry-size={entry}"
    q = run(qemu_img(), "info", "--image-opts", spec, check=False)
    s = run(binary("strata-img"), "info", "--image-opts", spec, check=False)
    assert s.returncode == q.returncode, (q.stderr, s.stderr)
    if q.returncode:
        assert s.stderr.replace("strata-img:", "qemu-img:") == q.stderr
        assert "L2 cache entry size must be a power of two" in q.stderr
    else:
        assert s.stderr == ""


def test_entry_size_not_a_size(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, MiB)
    p = sio(img, ["read 0 512"], extra=["-o", "l2-cache-entry-size=x"],
            check=False)
    assert p.returncode == 1 and "l2-cache-entry-size" in p.stderr


def random_ops(rng, model, n, cs, zeros=True):
    ops = []
    for _ in range(n):
        off = rng.randrange(0, SIZE // 512) * 512
        length = min(rng.choice([512, 4 * KiB, cs, 3 * cs, 200 * KiB]),
                     SIZE - off)
        if zeros and rng.random() < 0.2:
            ops.append(model.zero(off, length, unmap=rng.random() < 0.5))
        else:
            ops.append(model.write(off, length, rng.randrange(1, 256)))
    return ops


def tiny(cache="2k"):
    return ["-o", f"l2-cache-entry-size=512,l2-cache-size={cache}"]


def slices_chain(tmp_path, seed, cs, **opts):
    """base <- mid <- top written by qemu-io (base) and strata-io with 512
    byte slices (mid, top), and a twin chain written by qemu-io alone."""
    rng = random.Random(seed)
    model = Model(SIZE)
    chains = {}
    for name in ("s", "q"):
        d = tmp_path / name
        d.mkdir()
        create(d / "base.qcow2", SIZE, cluster_size=cs, **opts)
        create(d / "mid.qcow2", SIZE, backing="base.qcow2", cluster_size=cs,
               **opts)
        create(d / "top.qcow2", SIZE, backing="mid.qcow2", cluster_size=cs,
               **opts)
        chains[name] = d
    layers = [("base", random_ops(rng, model, 40, cs, zeros=False)),
              ("mid", random_ops(rng, model, 80, cs)),
              ("top", random_ops(rng, model, 160, cs))]
    for layer, ops in layers:
        qio(chains["q"] / f"{layer}.qcow2", ops)
        if layer == "base":
            qio(chains["s"] / f"{layer}.qcow2", ops)
        else:
            sio(chains["s"] / f"{layer}.qcow2", ops, extra=tiny())
    return model, chains


def verify(model, chains):
    top = chains["s"] / "top.qcow2"
    check_reads(lambda p, ops, fmt, check: qio(p, ops, fmt=fmt, check=check),
                top, model)
    check_reads(lambda p, ops, fmt, check: sio(p, ops, fmt=fmt, check=check,
                                               extra=tiny("1k")),
                top, model)
    run(qemu_img(), "compare", str(top), str(chains["q"] / "top.qcow2"))
    for layer in ("base", "mid", "top"):
        qemu_check(chains["s"] / f"{layer}.qcow2")


@pytest.mark.parametrize("seed", [1, 2])
def test_tiny_slices_random_writes_on_chain(tmp_path, seed):
    print(f"seed {seed}")
    model, chains = slices_chain(tmp_path, seed, 64 * KiB)
    verify(model, chains)


def test_tiny_slices_extended_l2(tmp_path):
    model, chains = slices_chain(tmp_path, 3, 64 * KiB, extended_l2="on")
    verify(model, chains)


def test_tiny_slices_small_clusters(tmp_path):
    # 4 KiB clusters: eight slices per table, a table per 2 MiB.
    model, chains = slices_chain(tmp_path, 4, 4 * KiB)
    verify(model, chains)


def test_tiny_slices_with_internal_snapshot(tmp_path):
    """Writes after qemu-img snapshot -c copy shared L2 tables (COW) one
    slice at a time; the snapshot keeps what it had."""
    rng = random.Random(5)
    model = Model(SIZE)
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qio(img, random_ops(rng, model, 60, 64 * KiB, zeros=False))
    before = Model(SIZE, model)
    run(qemu_img(), "snapshot", "-c", "s1", str(img))
    sio(img, random_ops(rng, model, 120, 64 * KiB), extra=tiny())
    qemu_check(img)
    check_reads(lambda p, ops, fmt, check: qio(p, ops, fmt=fmt, check=check),
                img, model)
    snap = tmp_path / "snap.qcow2"
    run(qemu_img(), "convert", "-l", "snapshot.name=s1", "-O", "qcow2",
        str(img), str(snap))
    check_reads(lambda p, ops, fmt, check: qio(p, ops, fmt=fmt, check=check),
                snap, before)
    assert os.path.getsize(img) > 0
