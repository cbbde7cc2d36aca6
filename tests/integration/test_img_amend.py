"""strata-img amend against qemu-img 7.2.

Each case builds one image, copies it, amends one copy with each tool and
compares: exit code, stdout, stderr (program name aside), qemu-img check,
info --output=json (file name and disk usage aside) and the guest data.
The cases strata refuses on purpose (they rewrite data) are checked for a
clear one-line error and an untouched file.
"""
import json
import shutil

import pytest

from harness import (assert_progress_bar, binary, drop_qemu_progress,
                      file_state, run, run_on_pty)
from harness.crash import build_shim, crash_env
from harness.qcow2 import (MiB, Model, check_reads, create, header,
                           qemu_check, qemu_img, qio)


def size_arg(v):
    if v[-1] in "kM":
        return int(v[:-1]) * {"k": 1024, "M": MiB}[v[-1]]
    return int(v)


def build(path, create_opts, ops=(), backing=None):
    """An image with 1 MiB of data and OPS (qemu-io write commands: -z
    zeros, -c compressed 0xcd), and its model."""
    create(path, 64 * MiB, backing=backing, **create_opts)
    m = Model(64 * MiB)
    qio(path, [m.write(0, 1 * MiB, 0x11)] + list(ops))
    for op in ops:
        w = op.split()
        off, length = size_arg(w[-2]), size_arg(w[-1])
        if "-z" in w:
            m.zero(off, length)
        else:
            m.write(off, length, 0xcd)
    return m


def info(path):
    d = json.loads(run(qemu_img(), "info", "--output=json", path.name,
                       cwd=path.parent).stdout)
    d.pop("filename")
    d.pop("actual-size")
    return d


def both(tmp_path, src, args):
    qp, sp = tmp_path / "q.qcow2", tmp_path / "s.qcow2"
    shutil.copy(src, qp)
    shutil.copy(src, sp)
    q = run(qemu_img(), "amend", *args, qp.name, cwd=tmp_path, check=False)
    s = run(binary("strata-img"), "amend", *args, sp.name, cwd=tmp_path,
            check=False)
    msg = f"qemu-img:\n{q.stdout}{q.stderr}\nstrata-img:\n{s.stdout}{s.stderr}"
    assert s.returncode == q.returncode, msg
    # -p: qemu-img draws its steps into the pipe, strata-img only on a
    # terminal (test_progress_on_a_terminal).
    assert s.stdout == drop_qemu_progress(q.stdout), msg
    assert s.stderr.replace("strata-img", "qemu-img") == q.stderr, msg
    return q, qp, sp


CASES = [
    ({}, ["-o", "compat=0.10"], ()),
    ({}, ["-o", "compat=v2"], ()),
    ({}, ["-o", "compat=1.1"], ()),
    ({"compat": "0.10"}, ["-o", "compat=1.1"], ()),
    ({"compat": "0.10"}, ["-o", "compat=v3,lazy_refcounts=on"], ()),
    ({}, ["-o", "lazy_refcounts=on"], ()),
    ({"lazy_refcounts": "on"}, ["-o", "lazy_refcounts=off"], ()),
    ({"lazy_refcounts": "on"}, ["-o", "compat=0.10"], ()),
    ({}, ["-o", "compat=0.10", "-o", "compat=1.1"], ()),
    ({}, ["-o", "size=128M"], ()),
    ({}, ["-o", "size=32M"], ()),
    ({}, ["-o", "refcount_bits=16"], ()),
    # refcount width changes (compressed clusters span host clusters)
    ({}, ["-o", "refcount_bits=8"], ("write -c 2M 128k",)),
    ({}, ["-o", "refcount_bits=64"], ("write -c 2M 128k",)),
    ({}, ["-o", "refcount_bits=1"], ()),
    ({"cluster_size": "512"}, ["-o", "refcount_bits=64"], ()),
    ({"refcount_bits": "8"}, ["-o", "compat=0.10,refcount_bits=16"], ()),
    ({"compat": "0.10"}, ["-o", "compat=1.1,refcount_bits=4"], ()),
    ({}, ["-o", "refcount_bits=2,size=128M"], ()),
    ({}, ["-p", "-o", "compat=0.10"], ()),
    ({}, ["-q", "-p", "-o", "compat=0.10"], ()),
    ({}, ["-o", "help"], ()),
    # zero clusters without a backing file become unallocated
    ({}, ["-o", "compat=0.10"], ("write -z 4M 1M", "write -z -u 0 64k")),
    # zstd is dropped when nothing is compressed, refused otherwise
    ({"compression_type": "zstd"}, ["-o", "compat=0.10"], ()),
    ({"compression_type": "zstd"}, ["-o", "compat=0.10"],
     ("write -c 2M 64k",)),
    # refusals, with qemu-img's messages
    ({}, ["-o", "compat=0.10,lazy_refcounts=on"], ()),
    ({"compat": "0.10"}, ["-o", "lazy_refcounts=on"], ()),
    ({}, ["-o", "compat=0.10,refcount_bits=8"], ()),
    ({"refcount_bits": "8"}, ["-o", "compat=0.10"], ()),
    ({"extended_l2": "on"}, ["-o", "compat=0.10"], ()),
    ({}, ["-o", "cluster_size=4k"], ()),
    ({}, ["-o", "preallocation=full"], ()),
    ({}, ["-o", "bogus=1"], ()),
    ({}, ["-o", "compat=2"], ()),
    ({}, ["-o", "lazy_refcounts=maybe"], ()),
    ({}, ["-o", "backing_file=x"], ()),
    ({}, ["-o", "backing_fmt=raw"], ()),
    ({}, ["-o", "size=1000"], ()),
    ({}, ["-o", "size=abc"], ()),
    ({}, ["-o", "refcount_bits=3"], ()),
    ({}, ["-o", "data_file=x"], ()),
    ({}, ["-o", "data_file=x,compat=2"], ()),
    ({}, ["-o", "data_file_raw=on"], ()),
    ({}, ["-o", "encrypt.state=active"], ()),
    ({}, ["-o", "cluster_size=4k,bogus=1"], ()),
    ({}, ["-o", "compat=2,cluster_size=4k"], ()),
    ({}, ["-o", "encrypt.format=luks"], ()),
    ({}, ["-o", "compat=1.1,?"], ()),
    ({}, ["-o", ""], ()),
    ({}, [], ()),
    ({}, ["-z", "-o", "compat=1.1"], ()),
]


@pytest.mark.parametrize("copts,args,ops", CASES)
def test_amend_like_qemu(tmp_path, copts, args, ops):
    src = tmp_path / "src.qcow2"
    m = build(src, copts, ops)
    before = file_state(src)
    q, qp, sp = both(tmp_path, src, args)
    if q.returncode:
        assert file_state(sp) == before
        return
    qemu_check(sp)
    assert info(sp) == info(qp)
    run(qemu_img(), "compare", str(qp), str(sp))
    size = header(sp)["size"]
    check_reads(qio, sp, Model(size, m) if size != m.size else m)


def test_backing_file_kept_across_versions(tmp_path):
    base = tmp_path / "base.qcow2"
    create(base, 64 * MiB)
    qio(base, ["write -P 0x42 8M 1M"])
    for copts, args in (({"compat": "0.10"}, ["-o", "compat=1.1"]),
                        ({}, ["-o", "compat=0.10,backing_file=base.qcow2,"
                                    "backing_fmt=qcow2"])):
        src = tmp_path / "src.qcow2"
        if src.exists():
            src.unlink()
        m = build(src, copts, backing="base.qcow2")
        m.write(8 * MiB, 1 * MiB, 0x42)
        q, qp, sp = both(tmp_path, src, args)
        assert q.returncode == 0
        qemu_check(sp)
        assert info(sp) == info(qp)
        check_reads(qio, sp, m)


def test_raw_is_refused_like_qemu(tmp_path):
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    for args in (["-f", "raw", "-o", "size=2M"], ["-o", "compat=1.1"]):
        q = run(qemu_img(), "amend", *args, raw.name, cwd=tmp_path,
                check=False)
        s = run(binary("strata-img"), "amend", *args, raw.name, cwd=tmp_path,
                check=False)
        assert s.returncode == q.returncode == 1
        assert (s.stderr.replace("strata-img", "qemu-img").splitlines()[-1]
                == q.stderr.splitlines()[-1])
    assert raw.read_bytes() == bytes(MiB)


def test_downgrade_converts_snapshot_tables(tmp_path):
    """Zero clusters of a snapshot's own L2 tables are converted too."""
    img = tmp_path / "a.qcow2"
    m = build(img, {}, ("write -z 8M 1M",))
    run(qemu_img(), "snapshot", "-c", "s", str(img))
    qio(img, ["write -P 0x33 8M 64k", "write -z 20M 64k"])
    run(binary("strata-img"), "amend", "-o", "compat=0.10", str(img))
    assert header(img)["version"] == 2
    qemu_check(img)
    run(qemu_img(), "snapshot", "-a", "s", str(img))
    qemu_check(img)
    check_reads(qio, img, m)


@pytest.mark.parametrize("backing", [False, True])
def test_downgrade_writes_zero_clusters(tmp_path, backing):
    """Zero clusters that must become data in version 2 (preallocated ones,
    and any over a backing file) are written as zeros, as QEMU does."""
    base = None
    if backing:
        base = "b.qcow2"
        create(tmp_path / base, 64 * MiB)
        qio(tmp_path / base, ["write -P 0x77 0 8M"])
    src = tmp_path / "src.qcow2"
    m = build(src, {}, ("write -z 0 64k", "write -z 4M 128k",
                        "write -z -u 512k 64k"), backing=base)
    if backing:
        m.data[1 * MiB:8 * MiB] = b"\x77" * (7 * MiB)
        for off, n in ((0, 64 * 1024), (4 * MiB, 128 * 1024),
                       (512 * 1024, 64 * 1024)):
            m.zero(off, n)
    q, qp, sp = both(tmp_path, src, ["-o", "compat=0.10"])
    assert q.returncode == 0
    qemu_check(sp)
    assert info(sp) == info(qp)
    run(qemu_img(), "compare", str(qp), str(sp))
    check_reads(qio, sp, m)


def test_refuses_zero_clusters_shared_with_a_snapshot(tmp_path):
    create(tmp_path / "b.qcow2", 64 * MiB)
    img = tmp_path / "a.qcow2"
    build(img, {}, ("write -z -u 2M 64k",), backing="b.qcow2")
    run(qemu_img(), "snapshot", "-c", "s", str(img))
    before = file_state(img)
    p = run(binary("strata-img"), "amend", "-o", "compat=0.10", img.name,
            cwd=tmp_path, check=False)
    err = p.stderr.strip()
    assert p.returncode == 1 and err.startswith("strata-img: ")
    assert "\n" not in err and "strata does not" in err, err
    assert file_state(img) == before


@pytest.mark.parametrize("copts,args,ops", [
    ({}, ["-o", "compat=0.10"], ("write -z -u 4M 1M",)),
    ({}, ["-o", "compat=0.10"], ("write -z 0 128k",)),   # preallocated
    ({"compat": "0.10"}, ["-o", "compat=1.1,lazy_refcounts=on"], ()),
    ({}, ["-o", "refcount_bits=4"], ()),
])
def test_crash_points(tmp_path, copts, args, ops):
    """A power failure before any write or flush of an amend leaves an
    image qemu-img check finds consistent, of the old or the new version,
    with the same guest data."""
    shim_so = build_shim(tmp_path)
    orig = tmp_path / "orig.qcow2"
    m = build(orig, copts, ops)
    if "write -z 0 128k" not in ops:   # a snapshot would share them
        run(qemu_img(), "snapshot", "-c", "s", str(orig))
    img, count = tmp_path / "img.qcow2", tmp_path / "count"
    shutil.copy(orig, img)
    run(binary("strata-img"), "amend", *args, img,
        env=crash_env(str(shim_so), img, CRASH_COUNT=count))
    total = int(count.read_text().split()[0])
    for n in range(1, total + 1):
        for lose in (0, 1, 3):
            shutil.copy(orig, img)
            p = run(binary("strata-img"), "amend", *args, img, check=False,
                    env=crash_env(str(shim_so), img, CRASH_AT=n,
                                  CRASH_LOSE=lose))
            where = f"crash before event {n}/{total} (lose={lose})"
            assert p.returncode == 99, (where, p.stderr)
            c = run(qemu_img(), "check", img, check=False)
            assert c.returncode in (0, 3) and "ERROR" not in (
                c.stdout + c.stderr), f"{where}:\n{c.stdout}{c.stderr}"
            assert header(img)["version"] in (2, 3)
            check_reads(qio, img, m)


def test_refcount_width_with_snapshots(tmp_path):
    """Shared clusters keep their counts across widths; a width too narrow
    for them is refused as qemu-img refuses it, the file untouched."""
    img = tmp_path / "a.qcow2"
    m = build(img, {})
    run(qemu_img(), "snapshot", "-c", "s", str(img))
    before = file_state(img)
    q = run(qemu_img(), "amend", "-o", "refcount_bits=1", str(img),
            check=False)
    assert file_state(img) == before
    s = run(binary("strata-img"), "amend", "-o", "refcount_bits=1", str(img),
            check=False)
    assert s.returncode == q.returncode == 1
    assert s.stderr.replace("strata-img", "qemu-img") == q.stderr
    assert file_state(img) == before
    for bits in ("2", "64", "16"):
        run(binary("strata-img"), "amend", "-o", f"refcount_bits={bits}",
            str(img))
        qemu_check(img)
        assert info(img)["format-specific"]["data"]["refcount-bits"] == int(
            bits)
    m2 = Model(64 * MiB, m)
    run(binary("strata-io"), "-f", "qcow2", "-c", m2.write(0, 128 * 1024, 0x5),
        str(img))
    qemu_check(img)
    check_reads(qio, img, m2)
    run(qemu_img(), "snapshot", "-a", "s", str(img))
    check_reads(qio, img, m)


def test_progress_on_a_terminal(tmp_path):
    """-p draws strata-img's bar on a terminal (nothing in a pipe)."""
    src = tmp_path / "t.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", str(src), "16M")
    status, out = run_on_pty([binary("strata-img"), "amend", "-p", "-o",
                              "compat=0.10", str(src)])
    assert status == 0, out
    assert_progress_bar(out)
