"""strata-io reads qcow2 images that QEMU made, byte for byte.

QEMU's tools create and fill each image (patterns, zero writes, discards,
compressed clusters, backing chains); strata-io must read every byte the
model says is there ('read -P' over each run of equal bytes), and its
'map' output must equal qemu-io's line for line.
"""
import os
import re

import pytest

from harness import run
from harness.qcow2 import (KiB, MiB, Model, check_reads, create, qemu_img,
                           qio, sio)

LAYOUTS = [
    # (cluster size, compat, extended_l2)
    (512, "1.1", "off"),
    (4 * KiB, "1.1", "off"),
    (64 * KiB, "1.1", "off"),
    (2 * MiB, "1.1", "off"),
    (64 * KiB, "0.10", "off"),
    (4 * KiB, "0.10", "off"),
    (64 * KiB, "1.1", "on"),
    (32 * KiB, "1.1", "on"),
]


def fill_ops(model, cs):
    """A mix of writes that straddle clusters and subclusters."""
    sub = cs // 32 if cs >= 16 * KiB else cs
    return [
        model.write(cs // 2, 3 * cs, 0x11),
        model.write(1000, 5000, 0x22),
        model.zero(5 * cs, 2 * cs),
        model.write(9 * cs + sub, 2 * sub + 100, 0x33),
        model.zero(9 * cs + sub + 50, 100),
        model.write(12 * cs, cs, 0x44),
        model.zero(12 * cs, cs, unmap=True),
        model.write(14 * cs, 2 * cs, 0x55),
        f"discard {14 * cs} {cs}",
    ]


def parse_map(text):
    """strata-io/qemu-io map lines as [(start, length, allocated)]."""
    out = []
    for line in text.splitlines():
        m = re.search(r"\((0x[0-9a-f]+)\) bytes (not|   ) allocated at "
                      r"offset .*\((0x[0-9a-f]+)\)", line)
        assert m, line
        out.append((int(m.group(3), 16), int(m.group(1), 16),
                    m.group(2) != "not"))
    return out


def assert_same_map(path, fmt="qcow2"):
    q = qio(path, ["map"], fmt=fmt).stdout
    s = sio(path, ["map"], fmt=fmt).stdout
    assert s == q, f"map differs\nqemu-io:\n{q}\nstrata-io:\n{s}"


@pytest.mark.parametrize("cs,compat,ext", LAYOUTS,
                         ids=[f"{c}-{v}-l2ext{e}" for c, v, e in LAYOUTS])
def test_read_qemu_image(tmp_path, cs, compat, ext):
    size = max(20 * cs, 4 * MiB)
    img = tmp_path / "a.qcow2"
    opts = dict(cluster_size=cs, compat=compat)
    if ext == "on":
        opts["extended_l2"] = "on"
    create(img, size, **opts)
    m = Model(size)
    ops = fill_ops(m, cs)
    # Discarded data reads as zeros without a backing file.
    m.data[14 * cs:15 * cs] = bytes(cs)
    qio(img, ops)
    check_reads(qio, img, m)
    check_reads(sio, img, m)
    assert_same_map(img)
    info = sio(img, ["info"]).stdout
    qinfo = qio(img, ["info"]).stdout
    line = [l for l in qinfo.splitlines() if l.startswith("cluster size:")]
    assert line and line[0] in info.splitlines()


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_read_compressed(tmp_path, ctype, cs):
    size = max(2 * MiB, 3 * cs)
    raw = tmp_path / "src.raw"
    m = Model(size)
    m.write(0, 100 * KiB, 0x5a)
    m.write(300 * KiB, 8 * KiB + 3, 0xa5)
    m.write(1 * MiB, 512 * KiB, 0x01)
    m.write(size - 4 * KiB, 4 * KiB, 0xff)
    raw.write_bytes(bytes(m.data))
    img = tmp_path / "c.qcow2"
    run(qemu_img(), "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
        f"compression_type={ctype},cluster_size={cs}", raw, img)
    check_reads(sio, img, m)
    assert_same_map(img)
    # Overwrite part of a compressed cluster: the rest must survive.
    sio(img, [m.write(cs + 7, 100, 0x77)])
    check_reads(qio, img, m)
    check_reads(sio, img, m)


def test_read_backing_chain(tmp_path):
    """base (raw, shorter) <- mid <- top, relative names, -F given."""
    cs = 64 * KiB
    size = 4 * MiB
    base = Model(3 * MiB)
    base.write(0, 3 * MiB, 0xb0)
    (tmp_path / "base.raw").write_bytes(bytes(base.data))
    create(tmp_path / "mid.qcow2", 3 * MiB + cs // 2, backing="base.raw",
           backing_fmt="raw", cluster_size=cs)
    mid = Model(3 * MiB + cs // 2, base)
    qio(tmp_path / "mid.qcow2", [mid.write(cs, 2 * cs + 10, 0xd1),
                                 mid.zero(4 * cs, cs),
                                 mid.write(3 * MiB - 100, 200, 0xd2)])
    create(tmp_path / "top.qcow2", size, backing="mid.qcow2",
           cluster_size=cs)
    top = Model(size, mid)
    qio(tmp_path / "top.qcow2", [top.write(2 * cs + 5, 10, 0x70),
                                 top.zero(6 * cs, cs),
                                 top.write(3 * MiB + cs, cs, 0x71)])
    # Run from elsewhere: the names resolve against the overlay's directory.
    os.chdir("/")
    check_reads(qio, tmp_path / "top.qcow2", top)
    check_reads(sio, tmp_path / "top.qcow2", top)
    assert_same_map(tmp_path / "top.qcow2")


def test_read_qcow2_chain_three_deep(tmp_path):
    cs = 4 * KiB
    size = 1 * MiB
    create(tmp_path / "l0.qcow2", size, cluster_size=cs)
    m = Model(size)
    qio(tmp_path / "l0.qcow2", [m.write(0, 300 * KiB, 0x10)])
    for i in (1, 2):
        create(tmp_path / f"l{i}.qcow2", size, backing=f"l{i - 1}.qcow2",
               cluster_size=cs)
        qio(tmp_path / f"l{i}.qcow2",
            [m.write(i * 50 * KiB + 100, 20 * KiB, 0x10 + i),
             m.zero(i * 90 * KiB, 8 * KiB), f"discard {i * 200 * KiB} 8k"])
        m.data[i * 200 * KiB:i * 200 * KiB + 8 * KiB] = bytes(8 * KiB)
    check_reads(sio, tmp_path / "l2.qcow2", m)
    check_reads(qio, tmp_path / "l2.qcow2", m)
    assert_same_map(tmp_path / "l2.qcow2")
