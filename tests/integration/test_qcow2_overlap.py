"""strata refuses guest writes that would overwrite the image's metadata.

Each image is made by QEMU (two L2 tables, one refcount block) and then
patched with struct so that an L2 entry (or an L1 entry) points at the
header, the L1 table, the refcount table, the refcount block or another L2
table, as QEMU's "Preventing invalid write on metadata" guards against.
A write through that mapping must fail (exit 1, a message naming the
metadata), leave every byte of the file as it was, refuse every later
write of the same process, and leave reads working.
"""
import struct

import pytest

from harness import file_state
from harness.qcow2 import KiB, MiB, create, header, patch, qio, sio

CS = 64 * KiB
SECOND = 512 * MiB   # first guest offset mapped by the second L2 table


def image(tmp_path):
    img = tmp_path / "o.qcow2"
    create(img, 1024 * MiB, cluster_size=CS)
    qio(img, ["write -q -P 0x11 0 64k", "write -q -P 0x22 64k 64k",
              f"write -q -P 0x33 {SECOND} 64k"])
    return img


def l1_entries(img):
    h = header(img)
    with open(img, "rb") as f:
        f.seek(h["l1_table_offset"])
        return struct.unpack(">2Q", f.read(16))


def l2_of(img, i):
    return l1_entries(img)[i] & 0x00fffffffffffe00


def refblock(img):
    with open(img, "rb") as f:
        f.seek(header(img)["refcount_table_offset"])
        return struct.unpack(">Q", f.read(8))[0] & ~0x1ff


def metadata(img):
    """The bytes of every metadata cluster, by name."""
    h = header(img)
    spans = {
        "header": (0, CS),
        "L1": (h["l1_table_offset"], CS),
        "refcount table": (h["refcount_table_offset"], CS),
        "refcount block": (refblock(img), CS),
        "L2 #0": (l2_of(img, 0), CS),
        "L2 #1": (l2_of(img, 1), CS),
    }
    with open(img, "rb") as f:
        out = {}
        for name, (off, n) in spans.items():
            f.seek(off)
            out[name] = f.read(n)
    return out


def point_l2_entry(img, target):
    """Map guest cluster 1 (64k) onto host offset TARGET, COPIED."""
    patch(img, l2_of(img, 0) + 8, ">Q", (1 << 63) | target)


TARGETS = {
    # name: (host offset of the metadata, text the error must contain)
    "l1": (lambda img: header(img)["l1_table_offset"], "active L1 table"),
    "refcount-table": (lambda img: header(img)["refcount_table_offset"],
                       "refcount table"),
    "refcount-block": (refblock, "refcount block"),
    "other-l2": (lambda img: l2_of(img, 1), "L2 table"),
    "own-l2": (lambda img: l2_of(img, 0), "L2 table"),
}


def check_refused(img, before_meta, before_file, write, want):
    p = sio(img, [write, "write -q -P 0x55 128k 4k"], check=False)
    out = p.stdout + (p.stdout + p.stderr)
    assert p.returncode == 1, f"exit {p.returncode}\n{out}"
    assert want in out and "overlap" in out, out
    assert str(img) in out or img.name in out, out
    # The later, harmless write is refused too: the node stays read-only.
    assert "refus" in out.splitlines()[-1], out
    assert metadata(img) == before_meta
    assert file_state(img) == before_file


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("length", ["4k", "64k"])
def test_l2_entry_onto_metadata(tmp_path, name, length):
    img = image(tmp_path)
    target, want = TARGETS[name]
    point_l2_entry(img, target(img))
    before_meta, before_file = metadata(img), file_state(img)
    check_refused(img, before_meta, before_file,
                  f"write -q -P 0x66 64k {length}",
                  f"guest offset {64 * KiB}")
    out = sio(img, [f"write -q -P 0x66 64k {length}"], check=False)
    assert want in out.stdout + out.stderr, out
    # Reads still work, through the bad mapping and elsewhere.
    sio(img, ["read -q -P 0x11 0 64k", f"read -q -P 0x33 {SECOND} 64k",
              "read -q 64k 64k"])
    assert file_state(img) == before_file


def test_l2_entry_onto_header(tmp_path):
    """Host offset 0 with COPIED: refused before any write, as hostile."""
    img = image(tmp_path)
    point_l2_entry(img, 0)
    before_meta, before_file = metadata(img), file_state(img)
    p = sio(img, ["write -q -P 0x66 64k 4k"], check=False)
    assert p.returncode == 1 and "image header" in (p.stdout + p.stderr), (p.stdout + p.stderr)
    assert metadata(img) == before_meta and file_state(img) == before_file
    sio(img, ["read -q -P 0x11 0 64k"])


def test_l2_entry_onto_header_cluster(tmp_path):
    """A 512-byte-aligned host offset inside the header cluster."""
    img = image(tmp_path)
    patch(img, l2_of(img, 0) + 8, ">Q", (1 << 63) | 0x8000)
    before_meta, before_file = metadata(img), file_state(img)
    p = sio(img, ["write -q -P 0x66 64k 4k"], check=False)
    assert p.returncode == 1, (p.stdout + p.stderr)
    assert "header" in (p.stdout + p.stderr) or "aligned" in (p.stdout + p.stderr), (p.stdout + p.stderr)
    assert metadata(img) == before_meta and file_state(img) == before_file


def test_l1_entry_onto_refcount_block(tmp_path):
    """An L2 table that is really the refcount block: updating either
    would overwrite the other."""
    img = image(tmp_path)
    h = header(img)
    patch(img, h["l1_table_offset"] + 8, ">Q", (1 << 63) | refblock(img))
    before_meta, before_file = metadata(img), file_state(img)
    p = sio(img, [f"write -q -P 0x66 {SECOND + 100 * CS} 4k"], check=False)
    assert p.returncode == 1, p.stdout + (p.stdout + p.stderr)
    assert "overlap" in (p.stdout + p.stderr) and ("refcount block" in (p.stdout + p.stderr)
                                      or "L2 table" in (p.stdout + p.stderr)), (p.stdout + p.stderr)
    assert metadata(img) == before_meta and file_state(img) == before_file
    sio(img, ["read -q -P 0x11 0 64k"])


def test_zero_refcount_on_l1_table(tmp_path):
    """A refcount of 0 on the L1 table: the allocator must not hand it out
    for new data."""
    img = image(tmp_path)
    h = header(img)
    rb = refblock(img)
    patch(img, rb + 2 * (h["l1_table_offset"] // CS), ">H", 0)
    before_meta, before_file = metadata(img), file_state(img)
    p = sio(img, ["write -q -P 0x66 1M 4k"], check=False)
    assert p.returncode == 1, p.stdout + (p.stdout + p.stderr)
    assert "active L1 table" in (p.stdout + p.stderr), (p.stdout + p.stderr)
    assert metadata(img) == before_meta and file_state(img) == before_file


def test_clean_image_writes(tmp_path):
    """No false alarms: allocating writes across both L2 tables, new L2
    tables and refcount growth leave an image qemu-img check accepts."""
    img = image(tmp_path)
    sio(img, ["write -q -P 0x44 0 1M", f"write -q -P 0x45 {SECOND - 4096} 8k",
              "write -q -P 0x46 1000M 4k", "write -q -z 2M 1M"])
    qio(img, ["read -q -P 0x44 0 1M", f"read -q -P 0x45 {SECOND - 4096} 8k",
              "read -q -P 0x46 1000M 4k", "read -q -P 0 2M 1M"])
