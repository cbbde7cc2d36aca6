"""qcow2 images with persistent dirty bitmaps: strata lists them (through
the driver's strata_bitmap_list) and keeps them across read-write opens.

A writer that did not maintain bitmaps would have to clear autoclear bit
0, after which QEMU throws the bitmaps away ("a program lacking bitmap
support modified this file") and their owner must start incremental
backups again from a full one.  strata loads them, marks them in use and
stores them at close (bitmaps-persist.c), so every path that opens such an
image read-write leaves them listed and checked clean by QEMU, with the
enabled one recording what was written; a directory strata cannot keep
refuses read-write opens with one line saying why and leaves the file as
it was.  The bitmaps are made by qemu-img bitmap --add; qemu-img and
qemu-nbd (the bitmap's extents) are the oracles.
"""
import hashlib
import json
import struct
import subprocess

import pytest

from harness import QMP, binary, need, run, spawn, stop

BITMAPS_EXT = 0x23852875


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dirty_extents(path, name):
    """[(offset, length)] of the dirty extents of bitmap NAME, as qemu-nbd
    serves them to nbdinfo."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    qemu_nbd = need("qemu-nbd", "qemu-utils")
    out = run(nbdinfo, "--json", f"--map=qemu:dirty-bitmap:{name}", "--",
              "[", qemu_nbd, "-r", "-f", "qcow2", "-B", name, path, "]")
    return [(e["offset"], e["length"]) for e in json.loads(out.stdout)
            if e["type"] & 1]


@pytest.fixture
def qemu_img():
    return need("qemu-img", "qemu-utils")


@pytest.fixture
def img(tmp_path, qemu_img):
    """64 MiB qcow2 with data and two bitmaps: b0 (auto), b1 (disabled,
    512-byte granularity); and top.qcow2, an overlay with none."""
    qemu_io = need("qemu-io", "qemu-utils")
    p = tmp_path / "img.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", p, "64M")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 7 0 1M", p)
    run(qemu_img, "bitmap", "--add", p, "b0")
    run(qemu_img, "bitmap", "--add", "-g", "512", "--disable", p, "b1")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 8 2M 64k", p)
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F",
        "qcow2", tmp_path / "top.qcow2")
    return p


def assert_bitmaps_intact(qemu_img, p):
    info = run(qemu_img, "info", "--output=json", p)
    assert "lacking bitmap support" not in info.stderr
    names = [b["name"] for b in
             json.loads(info.stdout)["format-specific"]["data"]["bitmaps"]]
    assert names == ["b0", "b1"]
    chk = run(qemu_img, "check", p)
    assert "No errors were found" in chk.stdout


# Each way a strata program opens an image read-write and exits, run in
# the image's directory; "img.qcow2" is the image with bitmaps, and WROTE
# what the command writes to it (b0 records it).
READ_WRITE = {
    "strata-io write": (["strata-io", "-c", "write -P 1 8M 4k", "img.qcow2"],
                        [(8 << 20, 64 << 10)]),
    "strata-io default": (["strata-io", "-c", "read 0 4k", "img.qcow2"], []),
    "strata-img resize": (["strata-img", "resize", "img.qcow2", "+1M"], []),
    "strata-img amend": (["strata-img", "amend", "-o", "lazy_refcounts=on",
                          "img.qcow2"], []),
    "strata-img snapshot": (["strata-img", "snapshot", "-c", "s1",
                             "img.qcow2"], []),
    "strata-img rebase": (["strata-img", "rebase", "-u", "-b", "",
                           "img.qcow2"], []),
    "strata-img check -r": (["strata-img", "check", "-r", "leaks",
                             "img.qcow2"], []),
    # The backing file is reopened read-write to take the overlay's data.
    "strata-img commit": (["strata-img", "commit", "top.qcow2"],
                          [(16 << 20, 64 << 10)]),
}


@pytest.mark.parametrize("case", sorted(READ_WRITE))
def test_read_write_open_keeps_bitmaps(tmp_path, img, qemu_img, case):
    argv, wrote = READ_WRITE[case]
    if case == "strata-img commit":
        run(need("qemu-io", "qemu-utils"), "-f", "qcow2", "-c",
            "write -P 3 16M 4k", tmp_path / "top.qcow2")
    p = subprocess.run([binary(argv[0])] + argv[1:], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "bitmap" not in p.stderr, p.stderr
    assert_bitmaps_intact(qemu_img, img)
    assert dirty_extents(img, "b0") == sorted([(2 << 20, 64 << 10)] + wrote)
    assert dirty_extents(img, "b1") == []


def test_read_only_use_works(tmp_path, img, qemu_img):
    for args in (["info", img], ["info", "--output=json", img]):
        ours = run(binary("strata-img"), *args)
        theirs = run(qemu_img, *args)
        assert ours.stdout == theirs.stdout
    io = run(binary("strata-io"), "-r", "-c", "read -P 8 2M 64k", img)
    assert "read 65536/65536 bytes" in io.stdout
    out = tmp_path / "out.qcow2"
    run(binary("strata-img"), "convert", "-O", "qcow2", img, out)
    run(qemu_img, "compare", img, out)
    run(binary("strata-img"), "check", img)
    assert_bitmaps_intact(qemu_img, img)


def header_ext(path):
    """(offset of the bitmaps extension's data, its bytes), or None."""
    data = path.read_bytes()
    pos = struct.unpack(">I", data[100:104])[0]
    while pos + 8 <= len(data):
        kind, length = struct.unpack(">II", data[pos:pos + 8])
        if kind == 0:
            return None
        if kind == BITMAPS_EXT:
            return pos + 8, data[pos + 8:pos + 8 + length]
        pos += 8 + (length + 7) // 8 * 8
    return None


def patch(path, offset, raw):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def test_stale_bitmaps_do_not_block_writes(tmp_path, img, qemu_img):
    """With autoclear bit 0 clear the bitmaps are already invalid (QEMU
    ignores them): they are not listed, and a write is allowed."""
    patch(img, 88, struct.pack(">Q", 0))
    ours = run(binary("strata-img"), "info", "--output=json", img)
    assert "bitmaps" not in json.loads(ours.stdout)["format-specific"]["data"]
    run(binary("strata-io"), "-c", "write -P 1 0 4k", img)
    run(binary("strata-io"), "-r", "-c", "read -P 1 0 4k", img)


@pytest.mark.parametrize("field,offset,raw,words", [
    ("entry flags", 12, struct.pack(">I", 1 << 5), "reserved flags"),
    ("entry type", 16, b"\x02", "type 2"),
    ("name size", 18, struct.pack(">H", 0), "name size 0"),
    ("table offset", 0, struct.pack(">Q", 0x1234), "table offset 0x1234"),
])
def test_malformed_directory(tmp_path, img, field, offset, raw, words):
    """A bad field of the first directory entry fails the listing (info
    exits 1 naming it) and still refuses a read-write open."""
    ext_off, ext = header_ext(img)
    assert struct.unpack(">I", ext[:4])[0] == 2
    dir_offset = struct.unpack(">Q", ext[16:24])[0]
    patch(img, dir_offset + offset, raw)
    p = run(binary("strata-img"), "info", img, check=False)
    assert p.returncode == 1, field
    assert "bitmap" in p.stderr and words in p.stderr, p.stderr
    before = sha(img)
    p = run(binary("strata-io"), "-c", "write 0 4k", img, check=False)
    assert p.returncode == 1
    assert "image has persistent dirty bitmaps" in p.stderr
    assert "open it read-only" in p.stderr and words in p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert sha(img) == before


def test_malformed_extension(tmp_path, img):
    ext_off, _ = header_ext(img)
    patch(img, ext_off + 4, struct.pack(">I", 1))   # reserved field
    p = run(binary("strata-img"), "info", img, check=False)
    assert p.returncode == 1
    assert "bitmaps extension reserved field is not zero" in p.stderr
    p = run(binary("strata-io"), "-c", "write 0 4k", img, check=False)
    assert p.returncode == 1 and "open it read-only" in p.stderr


def test_stratad_read_write_keeps_bitmaps(tmp_path, img, qemu_img):
    """QMP: a read-write blockdev-add and a read-only node reopened
    read-write work; the bitmaps are stored at quit."""
    sock = tmp_path / "qmp.sock"
    proc = spawn([binary("stratad"), "--qmp", sock],
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with QMP(sock, timeout=30) as m:
            m.execute("blockdev-add", {"driver": "file", "node-name": "ft",
                                       "filename": str(img),
                                       "read-only": True})
            m.execute("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                       "file": "ft", "read-only": True})
            m.execute("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "q", "file": "ft",
                 "read-only": False}]})
            nodes = {n["node-name"]: n["ro"] for n in
                     m.execute("query-named-block-nodes", {"flat": True})}
            assert nodes == {"q": False, "ft": False}
            m.execute("quit")
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert_bitmaps_intact(qemu_img, img)
    assert dirty_extents(img, "b0") == [(2 << 20, 64 << 10)]
