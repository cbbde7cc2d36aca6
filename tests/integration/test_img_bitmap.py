"""strata-img bitmap against qemu-img bitmap 7.2, and persistent bitmaps
both ways between strata and QEMU.

Each transcript row runs the same arguments through qemu-img and
strata-img on twin images and asserts the same exit code and message
(program name and QEMU's generated node names masked); then qemu-img info
lists the same bitmaps in both and qemu-img check finds both clean.  The
interop tests make bitmaps with one program, write with the other, and
read the bitmaps' dirty extents back through qemu-nbd (nbdinfo --map).
"""
import json
import re
import subprocess

import pytest

from harness import binary, need, run
from test_qcow2_bitmaps_guard import dirty_extents

ROWS = [
    "--add {i} x", "--add {i} x", "--remove {i} nope", "--add {v2} y",
    "--add -g 1000 {i} g", "--add -g 4G {i} g", "--add -g 2G {i} g2",
    "--add -g abc {i} g", "--clear {i} nope", "--enable {i} x",
    "--merge nope {i} x", "{i} x", "--add {i}", "--add --disable {i} d",
    "--remove --add {i} x2", "--merge x -F qcow2 {i} y", "--bogus {i} x",
    "-g 512 --clear {i} x", "-b {i} --clear {i} x",
    "--add -g 512 {i} small", "--disable {i} x --clear",
    "--merge small {i} d", "--remove {i} g2", "--merge d -b {big} {i} x",
]


def mask(text, tool, tmp):
    text = text.replace(tool, "TOOL").replace(str(tmp) + "/", "")
    text = re.sub(r"\b[qs](img|v2)\.qcow2", r"\1.qcow2", text)
    return re.sub(r"#block\d+", "NODE", text)


def bitmaps(qemu_img, path):
    out = run(qemu_img, "info", "--output=json", path).stdout
    return json.loads(out)["format-specific"]["data"].get("bitmaps")


def test_transcript_matches_qemu_img(tmp_path):
    qemu_img = need("qemu-img", "qemu-utils")
    big = tmp_path / "big.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", big, "32M")
    run(qemu_img, "bitmap", "--add", big, "d")
    seen = {}
    for who, tool in (("q", qemu_img), ("s", binary("strata-img"))):
        img, v2 = tmp_path / f"{who}img.qcow2", tmp_path / f"{who}v2.qcow2"
        run(qemu_img, "create", "-q", "-f", "qcow2", img, "1M")
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "compat=0.10",
            v2, "1M")
        rows = []
        for row in ROWS:
            args = row.format(i=img, v2=v2, big=big).split()
            p = subprocess.run([tool, "bitmap"] + args, capture_output=True,
                               text=True, timeout=60)
            name = "strata-img" if who == "s" else "qemu-img"
            rows.append((row, p.returncode,
                         mask(p.stdout + p.stderr, name, tmp_path)))
        seen[who] = rows
        assert "No errors were found" in run(qemu_img, "check", img).stdout
        seen[who + "bitmaps"] = bitmaps(qemu_img, img)
    for q, s in zip(seen["q"], seen["s"]):
        assert q == s
    assert seen["qbitmaps"] == seen["sbitmaps"]


def test_strata_bitmaps_record_qemu_writes(tmp_path):
    """Made by strata-img, written by qemu-io: QEMU keeps and updates
    them, and check is clean."""
    qemu_img = need("qemu-img", "qemu-utils")
    qemu_io = need("qemu-io", "qemu-utils")
    img = tmp_path / "a.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", img, "64M")
    run(binary("strata-img"), "bitmap", "--add", img, "on")
    run(binary("strata-img"), "bitmap", "--add", "-g", "4k", "--disable",
        img, "off")
    run(qemu_io, "-f", "qcow2", "-c", "write 5M 4k", img)
    assert dirty_extents(img, "on") == [(5 << 20, 64 << 10)]
    assert dirty_extents(img, "off") == []
    assert bitmaps(qemu_img, img) == [
        {"flags": ["auto"], "name": "on", "granularity": 65536},
        {"flags": [], "name": "off", "granularity": 4096}]
    assert "No errors were found" in run(qemu_img, "check", img).stdout


def test_qemu_bitmaps_record_strata_writes(tmp_path):
    """Made by qemu-img, written by strata-io (data, zeroes, discard) and
    cleared/merged by strata-img: QEMU reads the result."""
    qemu_img = need("qemu-img", "qemu-utils")
    img = tmp_path / "a.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", img, "64M")
    run(qemu_img, "bitmap", "--add", "-g", "1M", img, "q")
    run(binary("strata-io"), "-c", "write 1M 4k", "-c", "write -z 9M 4k",
        "-c", "discard 20M 1M", img)
    assert dirty_extents(img, "q") == [(1 << 20, 1 << 20), (9 << 20, 1 << 20),
                                        (20 << 20, 1 << 20)]
    run(binary("strata-img"), "bitmap", "--add", "--disable", img, "copy",
        "--merge", "q")
    run(binary("strata-img"), "bitmap", "--clear", img, "q")
    assert dirty_extents(img, "q") == []
    assert dirty_extents(img, "copy") == [(1 << 20, 1 << 20),
                                           (9 << 20, 1 << 20),
                                           (20 << 20, 1 << 20)]
    assert "No errors were found" in run(qemu_img, "check", img).stdout
    run(binary("strata-img"), "bitmap", "--remove", img, "q")
    run(binary("strata-img"), "bitmap", "--remove", img, "copy")
    assert bitmaps(qemu_img, img) is None
    assert "No errors were found" in run(qemu_img, "check", img).stdout


def test_in_use_bitmap_kept_inconsistent(tmp_path):
    """A bitmap left in use (its writer died) stays in use and listed;
    strata refuses to change it with QEMU's words, and writes go on."""
    qemu_img = need("qemu-img", "qemu-utils")
    img = tmp_path / "a.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", img, "64M")
    run(qemu_img, "bitmap", "--add", img, "b")
    data = bytearray(img.read_bytes())
    ext = data.find(bytes.fromhex("23852875"))
    diroff = int.from_bytes(data[ext + 24:ext + 32], "big")
    data[diroff + 15] |= 1  # in_use
    img.write_bytes(bytes(data))
    p = run(binary("strata-img"), "bitmap", "--clear", img, "b", check=False)
    assert p.returncode == 1
    assert "Bitmap 'b' is inconsistent and cannot be used" in p.stderr
    run(binary("strata-io"), "-c", "write 0 4k", img)
    assert bitmaps(qemu_img, img)[0]["flags"] == ["in-use", "auto"]
    run(binary("strata-img"), "bitmap", "--remove", img, "b")
    assert bitmaps(qemu_img, img) is None
    assert "No errors were found" in run(qemu_img, "check", img).stdout


HOSTILE = {  # field: (offset in the first entry, bytes, words in the error)
    "table in header": (0, (0x200).to_bytes(8, "big"),
                        "points into the image header"),
    "table past eof": (0, (0x7fff0000).to_bytes(8, "big"),
                       "outside the file"),
    "table size": (8, (0xffffffff).to_bytes(4, "big"), "table size"),
    "name 64k": (18, (0xffff).to_bytes(2, "big"), "name 65535 bytes"),
    "granularity 63": (17, bytes([63]), "granularity_bits 63"),
    "granularity 8": (17, bytes([8]), "granularity_bits 8"),
    "unknown flag": (12, (1 << 9).to_bytes(4, "big"), "reserved flags"),
    "duplicate name": (24, b"b1", "appears twice"),
}


@pytest.mark.parametrize("field", sorted(HOSTILE))
def test_hostile_directory_refused(tmp_path, field):
    """One line naming the field from info, check and a read-write open;
    check exits 1 as qemu-img check (which cannot open such an image)."""
    qemu_img = need("qemu-img", "qemu-utils")
    img = tmp_path / "h.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
        img, "1M")
    run(qemu_img, "bitmap", "--add", "-g", "4k", img, "b0")
    run(qemu_img, "bitmap", "--add", img, "b1")
    data = bytearray(img.read_bytes())
    ext = data.find(bytes.fromhex("23852875"))
    diroff = int.from_bytes(data[ext + 24:ext + 32], "big")
    off, raw, words = HOSTILE[field]
    data[diroff + off:diroff + off + len(raw)] = raw
    img.write_bytes(bytes(data))
    for argv in (["strata-img", "info", img], ["strata-img", "check", img],
                 ["strata-io", "-c", "write 0 4k", img]):
        p = run(binary(argv[0]), *argv[1:], check=False)
        assert p.returncode == 1, (argv, p.stdout, p.stderr)
        assert words in p.stderr and len(p.stderr.splitlines()) == 1, \
            p.stderr
    if field != "table past eof":  # qemu-img opens that one (exit 2)
        assert run(qemu_img, "check", img, check=False).returncode == 1


def test_kill_leaves_bitmaps_in_use(tmp_path):
    """A read-write strata that dies without closing leaves the bitmaps
    marked in use (QEMU's protocol) and the image clean."""
    qemu_img = need("qemu-img", "qemu-utils")
    img = tmp_path / "a.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", img, "64M")
    run(qemu_img, "bitmap", "--add", img, "b")
    proc = subprocess.Popen([binary("strata-io"), img],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        proc.stdin.write("write 0 4k\nread 0 1\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if "read 1/1" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert bitmaps(qemu_img, img)[0]["flags"] == ["in-use", "auto"]
    assert run(qemu_img, "check", img, check=False).returncode in (0, 3)


def test_crash_points_keep_bitmaps(tmp_path):
    """A power failure before any write or flush of a read-write session
    (marking in use, the writes, storing at close) leaves an image QEMU
    checks without corruption, both bitmaps listed, and each either still
    marked in use or, once stored, recording the write."""
    from harness.crash import build_shim, crash_at, crash_env
    qemu_img = need("qemu-img", "qemu-utils")
    shim = build_shim(tmp_path)
    orig, img = tmp_path / "orig.qcow2", tmp_path / "img.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", orig, "64M")
    run(qemu_img, "bitmap", "--add", orig, "b0")
    run(qemu_img, "bitmap", "--add", "-g", "512", "--disable", orig, "b1")
    args = ["-c", "write -P 5 3M 4k", "-c", "write -P 6 40M 64k"]
    img.write_bytes(orig.read_bytes())
    count = tmp_path / "count"
    run(binary("strata-io"), "-f", "qcow2", *args, img,
        env=crash_env(shim, img, CRASH_COUNT=count))
    total = int(count.read_text().split()[0])
    assert total > 5
    for n in range(1, total + 1):
        for lose in (0, 2, 3):
            crash_at(shim, orig, img, args, n, lose, total)
            listed = bitmaps(qemu_img, img)
            assert [b["name"] for b in listed] == ["b0", "b1"], (n, lose)
            if "in-use" in listed[0]["flags"]:
                continue
            got = dirty_extents(img, "b0")
            assert got in ([], [(3 << 20, 64 << 10),
                                (40 << 20, 64 << 10)]), (n, lose, got)
            if not got:  # not yet marked in use: nothing written yet
                r = run(need("qemu-io", "qemu-utils"), "-f", "qcow2", "-c",
                        "read -q -P 0 3M 4k", "-c", "read -q -P 0 40M 64k",
                        img, check=False)
                assert "fail" not in r.stdout, (n, lose, r.stdout)


def test_convert_bitmaps_as_qemu_img(tmp_path):
    """convert --bitmaps copies each bitmap (granularity, enabled, dirty
    extents) as qemu-img convert does, and refuses an inconsistent one
    with its words."""
    qemu_img = need("qemu-img", "qemu-utils")
    qemu_io = need("qemu-io", "qemu-utils")
    src = tmp_path / "src.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", src, "64M")
    run(qemu_io, "-f", "qcow2", "-c", "write 0 1M", src)
    run(qemu_img, "bitmap", "--add", src, "b0")
    run(qemu_img, "bitmap", "--add", "-g", "512", "--disable", src, "b1")
    run(qemu_io, "-f", "qcow2", "-c", "write 5M 4k", src)
    for who, tool in (("q", qemu_img), ("s", binary("strata-img"))):
        run(tool, "convert", "--bitmaps", "-O", "qcow2", src,
            tmp_path / f"{who}.qcow2")
    q, s = tmp_path / "q.qcow2", tmp_path / "s.qcow2"
    assert bitmaps(qemu_img, s) == bitmaps(qemu_img, q)
    assert dirty_extents(s, "b0") == dirty_extents(q, "b0") == \
        [(5 << 20, 64 << 10)]
    assert "No errors were found" in run(qemu_img, "check", s).stdout
    data = bytearray(src.read_bytes())
    ext = data.find(bytes.fromhex("23852875"))
    diroff = int.from_bytes(data[ext + 24:ext + 32], "big")
    data[diroff + 15] |= 1  # b0 in use
    src.write_bytes(bytes(data))
    out = {}
    for who, tool in (("q", qemu_img), ("s", binary("strata-img"))):
        p = run(tool, "convert", "--bitmaps", "-O", "qcow2", src,
                tmp_path / f"{who}2.qcow2", check=False)
        out[who] = (p.returncode,
                    re.sub(r"^(qemu|strata)-img:", "T:", p.stderr,
                           flags=re.M))
    assert out["q"] == out["s"]
