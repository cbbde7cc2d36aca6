"""strata-img resize against qemu-img 7.2.

Each case runs both tools on copies of one image: the same exit code,
messages and output, the same file length (qcow2 shrink truncates the file
after its last used cluster, as QEMU does), the same info --output=json,
qemu-img check clean and compare equal, and the kept guest data read back
with 'read -P'.
"""
import json
import shutil

import pytest

from harness import binary, file_state, run
from harness.crash import build_shim, crash_env
from harness.qcow2 import (KiB, MiB, Model, check_reads, create, header,
                           qemu_check, qemu_img, qio)


def both(tmp_path, src, args, fmt="qcow2"):
    """Resize copies of SRC with each tool; returns (q, s, qpath, spath)."""
    qp, sp = tmp_path / f"q.{fmt}", tmp_path / f"s.{fmt}"
    shutil.copy(src, qp)
    shutil.copy(src, sp)
    q = run(qemu_img(), "resize", *[a.replace("IMG", qp.name) for a in args],
            cwd=tmp_path, check=False)
    s = run(binary("strata-img"), "resize",
            *[a.replace("IMG", sp.name) for a in args], cwd=tmp_path,
            check=False)
    msg = f"qemu-img:\n{q.stdout}{q.stderr}\nstrata-img:\n{s.stdout}{s.stderr}"
    assert s.returncode == q.returncode, msg
    assert s.stdout == q.stdout, msg
    assert s.stderr.replace("strata-img", "qemu-img") == q.stderr, msg
    return q, s, qp, sp


def info(path, fmt):
    d = json.loads(run(qemu_img(), "info", "-f", fmt, "--output=json",
                       path.name, cwd=path.parent).stdout)
    d.pop("filename")
    d.pop("actual-size")
    for sn in d.get("snapshots", []):
        sn.pop("date-sec")
        sn.pop("date-nsec")
    return d


def agree(qp, sp, fmt="qcow2", same_length=True):
    assert info(qp, fmt) == info(sp, fmt)
    if same_length:
        assert sp.stat().st_size == qp.stat().st_size
    if fmt == "qcow2":
        qemu_check(sp)
    run(qemu_img(), "compare", "-f", fmt, "-F", fmt, str(qp), str(sp))


@pytest.fixture
def qimage(tmp_path):
    src = tmp_path / "src.qcow2"
    create(src, 64 * MiB)
    m = Model(64 * MiB)
    qio(src, [m.write(0, 1 * MiB, 0x11), m.write(20 * MiB, 3 * MiB, 0x22),
              m.write(33 * MiB, 64 * KiB, 0x23),
              "write -c -P 0x24 60M 64k"])
    m.write(60 * MiB, 64 * KiB, 0x24)
    return src, m


@pytest.mark.parametrize("size", ["128M", "+1G", "65M", "64M"])
def test_grow_qcow2(tmp_path, qimage, size):
    src, m = qimage
    q, s, qp, sp = both(tmp_path, src, ["IMG", size])
    assert q.returncode == 0 and q.stdout == "Image resized.\n"
    # A new L1 table: QEMU leaves the file's last cluster partial.
    agree(qp, sp, same_length=False)
    check_reads(qio, sp, m)


@pytest.mark.parametrize("size", ["32M", "--", "-30M", "20M", "1M",
                                  str(33 * MiB + 4 * KiB)])
def test_shrink_qcow2(tmp_path, qimage, size):
    src, m = qimage
    args = ["--shrink", "IMG", size] if size != "--" else ["--shrink", "IMG",
                                                            "--", "-30M"]
    q, s, qp, sp = both(tmp_path, src, args)
    assert q.returncode == 0, q.stderr
    agree(qp, sp)
    new = header(sp)["size"]
    kept = Model(new, m)
    check_reads(qio, sp, kept)
    assert sp.stat().st_size < src.stat().st_size


def test_shrink_with_snapshots(tmp_path, qimage):
    """qemu-img 7.2 shrinks an image with snapshots; the snapshots keep
    their data, and applying one restores its size."""
    src, m = qimage
    run(qemu_img(), "snapshot", "-c", "s", str(src))
    q, s, qp, sp = both(tmp_path, src, ["--shrink", "IMG", "10M"])
    assert q.returncode == 0
    agree(qp, sp)
    check_reads(qio, sp, Model(10 * MiB, m))
    run(qemu_img(), "snapshot", "-a", "s", str(sp))
    qemu_check(sp)
    check_reads(qio, sp, m)


@pytest.mark.parametrize("args", [
    ["IMG", "32M"],                              # needs --shrink
    ["IMG", "-1M"],
    ["--preallocation=full", "--shrink", "IMG", "32M"],
    ["--preallocation=full", "IMG", "64M"],     # not growing
    ["--preallocation=bogus", "IMG", "80M"],
    ["IMG", "0"],
    ["--shrink", "IMG", "--", "-64M"],
    ["IMG", "+1"],                               # qcow2: 512-byte multiple
    ["IMG", "abc"],
    ["IMG"],
    ["-z", "IMG", "1G"],
    ["IMG", "1G", "extra"],
])
def test_errors_qcow2(tmp_path, qimage, args):
    src, _ = qimage
    before = file_state(src)
    q, s, qp, sp = both(tmp_path, src, args)
    assert q.returncode == 1
    assert file_state(sp) == before


def test_quiet_and_preallocation(tmp_path, qimage):
    src, m = qimage
    q, s, qp, sp = both(tmp_path, src, ["-q", "IMG", "80M"])
    assert q.stdout == "" and q.returncode == 0
    agree(qp, sp)
    q, s, qp, sp = both(tmp_path, src, ["--preallocation=full", "IMG",
                                        "70M"])
    assert q.returncode == 0
    qemu_check(sp)
    run(qemu_img(), "compare", str(qp), str(sp))
    check_reads(qio, sp, Model(70 * MiB, m))


@pytest.mark.parametrize("args", [
    ["-f", "raw", "IMG", "5M"], ["-f", "raw", "IMG", "+1"],
    ["-f", "raw", "IMG", "-512k"], ["-f", "raw", "--shrink", "IMG", "512k"],
    ["-f", "raw", "--preallocation=full", "IMG", "3M"],
    ["-f", "raw", "--preallocation=falloc", "IMG", "3M"],
    ["-f", "raw", "--preallocation=full", "IMG", "1M"],
    ["-f", "raw", "--shrink", "IMG", "--", "-1M"],
])
def test_raw(tmp_path, args):
    src = tmp_path / "src.raw"
    src.write_bytes(bytes([0x5a]) * MiB)
    q, s, qp, sp = both(tmp_path, src, args, fmt="raw")
    assert sp.stat().st_size == qp.stat().st_size
    assert sp.stat().st_blocks == qp.stat().st_blocks
    assert sp.read_bytes() == qp.read_bytes()


def test_shrink_crash_points(tmp_path):
    """A power failure before any write or flush of a shrink (with a
    snapshot sharing the tables) leaves a consistent image (leaks allowed)
    whose kept range reads as before, and the snapshot intact."""
    shim_so = build_shim(tmp_path)
    orig = tmp_path / "orig.qcow2"
    create(orig, 8 * MiB, cluster_size=4 * KiB)
    m = Model(8 * MiB)
    qio(orig, [m.write(0, 64 * KiB, 0x11), m.write(3 * MiB, 1 * MiB, 0x12),
               m.write(7 * MiB, 64 * KiB, 0x13)])
    run(qemu_img(), "snapshot", "-c", "s", str(orig))
    img, count = tmp_path / "img.qcow2", tmp_path / "count"
    args = ["resize", "--shrink", img, str(3 * MiB + 8 * KiB)]
    shutil.copy(orig, img)
    run(binary("strata-img"), *args,
        env=crash_env(str(shim_so), img, CRASH_COUNT=count))
    total, *hdr = map(int, count.read_text().split())
    points = set(range(1, total + 1, max(1, total // 6))) | {total}
    for h in hdr:
        points |= set(range(max(1, h - 1), min(total, h + 1) + 1))
    kept = Model(3 * MiB + 8 * KiB, m)
    for n in sorted(points):
        for lose in (0, 1, 3):
            shutil.copy(orig, img)
            p = run(binary("strata-img"), *args, check=False,
                    env=crash_env(str(shim_so), img, CRASH_AT=n,
                                  CRASH_LOSE=lose))
            where = f"crash before event {n}/{total} (lose={lose})"
            assert p.returncode == 99, (where, p.stderr)
            c = run(qemu_img(), "check", img, check=False)
            assert c.returncode in (0, 3) and "ERROR" not in (
                c.stdout + c.stderr), f"{where}:\n{c.stdout}{c.stderr}"
            # The tail is dropped before the size changes: only the kept
            # range must read as before.
            assert header(img)["size"] in (m.size, kept.size)
            check_reads(qio, img, kept)
            run(qemu_img(), "snapshot", "-a", "s", str(img))
            check_reads(qio, img, m)
