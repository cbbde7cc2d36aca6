"""strata-img on qcow2 images and chains, with qemu-img as the oracle.

Images strata-img creates must pass `qemu-img check` with no errors or
leaks and report the same `info` as qemu-img's images created with the
same options; `info`, `map` and `compare` on chains must print what
qemu-img prints.
"""
import json
import os

import pytest

from harness import binary, run, spawn, wait_until
from harness.qcow2 import qemu_img, qemu_io

OPTION_SETS = [
    "cluster_size=512",
    "cluster_size=4096,compat=0.10",
    "cluster_size=65536",
    "cluster_size=65536,lazy_refcounts=on",
    "cluster_size=16384,extended_l2=on",
    "cluster_size=2M,compression_type=zstd",
    "cluster_size=2M,extended_l2=on,compat=1.1",
]


def simg(*args, check=True, cwd=None):
    return run(binary("strata-img"), *args, check=check, cwd=cwd)


def sio(path, *cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    return run(binary("strata-io"), "-f", "qcow2", *args, path)


def qinfo(path, *extra):
    return json.loads(run(qemu_img(), "info", "--output=json", *extra,
                          path).stdout)


def qcheck_clean(path):
    out = json.loads(run(qemu_img(), "check", "--output=json", path).stdout)
    assert out["check-errors"] == 0
    assert out.get("leaks", 0) == 0, out
    assert out.get("corruptions", 0) == 0, out
    return out


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_created_image_matches_qemu(tmp_path, opts):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    simg("create", "-q", "-f", "qcow2", "-o", opts, ours, "3G")
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", opts, theirs, "3G")
    qcheck_clean(ours)
    a, b = qinfo(ours), qinfo(theirs)
    for key in ("actual-size", "filename"):
        a.pop(key), b.pop(key)
    assert a == b
    # Our own info of our image says what qemu-img says of it.
    assert json.loads(simg("info", "--output=json", ours).stdout) == \
        qinfo(ours)


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_created_image_takes_writes_qemu_can_read(tmp_path, opts):
    img = tmp_path / "w.qcow2"
    simg("create", "-q", "-f", "qcow2", "-o", opts, img, "64M")
    sio(img, "write -P 0x11 0 100k", "write -P 0x22 10M 3M",
        "write -z 11M 64k", "write -P 0x33 63M 1M")
    qcheck_clean(img)
    run(qemu_io(), "-f", "qcow2", "-c", "read -P 0x11 0 100k",
        "-c", "read -P 0x22 10M 1M", "-c", "read -P 0 11M 64k",
        "-c", "read -P 0x22 12M 1M",
        "-c", "read -P 0x33 63M 1M", "-c", "read -P 0 32M 1M", img)


def make_chain(tmp_path, tool):
    """base <- mid <- top, all relative names, made by TOOL ("strata" or
    "qemu"); returns the top image's path."""
    d = tmp_path / tool
    d.mkdir()
    create = (lambda *a: simg("create", "-q", "-f", "qcow2", *a, cwd=d)) \
        if tool == "strata" else \
        (lambda *a: run(qemu_img(), "create", "-q", "-f", "qcow2", *a, cwd=d))
    create("-o", "cluster_size=65536", "base.qcow2", "16M")
    create("-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    create("-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    for img, ops in (("base.qcow2", ["write -P 1 0 2M", "write -P 1 8M 64k"]),
                     ("mid.qcow2", ["write -P 2 1M 512k", "write -z 8M 64k"]),
                     ("top.qcow2", ["write -P 3 1536k 64k",
                                    "discard 0 64k"])):
        args = []
        for c in ops:
            args += ["-c", c]
        run(qemu_io(), "-f", "qcow2", *args, d / img)
    return d / "top.qcow2"


def test_chain_created_by_strata_matches_qemus(tmp_path):
    ours, theirs = make_chain(tmp_path, "strata"), make_chain(tmp_path, "qemu")
    for o, t in ((ours, theirs),):
        for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
            qcheck_clean(o.parent / name)
        run(qemu_img(), "compare", o, t)
        a = run(qemu_img(), "map", "--output=json", o).stdout
        b = run(qemu_img(), "map", "--output=json", t).stdout
        assert a == b


@pytest.mark.parametrize("args", [
    ["info", "--output=json"],
    ["info", "--output=json", "--backing-chain"],
    ["info"],
    ["info", "--backing-chain"],
    ["map", "--output=json"],
    ["map"],
    ["map", "--output=json", "--start-offset=1M", "--max-length=1M"],
])
@pytest.mark.parametrize("where", ["same-dir", "other-dir"])
def test_chain_output_matches_qemu(tmp_path, args, where):
    top = make_chain(tmp_path, "qemu")
    cwd = top.parent if where == "same-dir" else tmp_path
    name = "top.qcow2" if where == "same-dir" else os.path.join("qemu",
                                                                "top.qcow2")
    ours = simg(*args, name, cwd=cwd).stdout
    theirs = run(qemu_img(), *args, name, cwd=cwd).stdout
    if args[0] == "info" and "--output=json" in args:
        a, b = json.loads(ours), json.loads(theirs)
        a, b = (a if isinstance(a, list) else [a]), \
            (b if isinstance(b, list) else [b])
        for x in a + b:
            x.pop("actual-size")   # allocation on disk, not our business
        assert a == b
    elif args[0] == "info":
        def strip(s):
            return [l for l in s.splitlines() if not l.startswith("disk size")]
        assert strip(ours) == strip(theirs)
    else:
        assert ours == theirs


def test_compare_chain_against_flat_copy(tmp_path):
    top = make_chain(tmp_path, "qemu")
    flat = tmp_path / "flat.raw"
    run(qemu_img(), "convert", "-O", "raw", top, flat)
    p = simg("compare", "-f", "qcow2", "-F", "raw", top, flat, check=False)
    assert (p.returncode, p.stdout) == (0, "Images are identical.\n")
    run(qemu_io(), "-f", "raw", "-c", "write -P 9 8M 1", flat)
    ours = simg("compare", "-f", "qcow2", "-F", "raw", top, flat, check=False)
    theirs = run(qemu_img(), "compare", "-f", "qcow2", "-F", "raw", top,
                 flat, check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout


def test_compare_strict_sees_allocation_difference(tmp_path):
    top = make_chain(tmp_path, "qemu")
    flat = tmp_path / "flat.qcow2"
    run(qemu_img(), "convert", "-O", "qcow2", top, flat)
    for tool in (binary("strata-img"), qemu_img()):
        p = run(tool, "compare", "-s", top, flat, check=False)
        assert p.returncode == 1, (tool, p.stdout)
        assert p.stdout.startswith("Strict mode: Offset"), (tool, p.stdout)


@pytest.mark.parametrize("opts,needle", [
    ("cluster_size=1000", "Cluster size"),
    ("cluster_size=4M", "Cluster size"),
    ("compat=0.9", "compatibility"),
    ("compat=0.10,lazy_refcounts=on", "Lazy refcounts"),
    ("extended_l2=on,cluster_size=4k", "Extended L2"),
    ("compression_type=lz4", "compression type"),
    ("refcount_bits=7", "refcount_bits"),
    ("colour=blue", "'colour'"),
])
def test_create_bad_options_leave_nothing(tmp_path, opts, needle):
    p = simg("create", "-f", "qcow2", "-o", opts, tmp_path / "x.qcow2", "1G",
             check=False)
    assert p.returncode == 1
    assert needle.lower() in p.stderr.lower(), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.qcow2").exists()


def test_create_backing_needs_format_and_existing_file(tmp_path):
    base = tmp_path / "base.qcow2"
    simg("create", "-q", "-f", "qcow2", base, "1M")
    p = simg("create", "-f", "qcow2", "-b", "base.qcow2",
             tmp_path / "a.qcow2", check=False)
    assert p.returncode == 1 and "backing format" in p.stderr
    p = simg("create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2",
             tmp_path / "b.qcow2", check=False)
    assert p.returncode == 1 and "nope.qcow2" in p.stderr
    assert not (tmp_path / "a.qcow2").exists()
    assert not (tmp_path / "b.qcow2").exists()
    # Size defaults to the backing file's; -u skips opening it.
    simg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         tmp_path / "c.qcow2")
    assert qinfo(tmp_path / "c.qcow2")["virtual-size"] == 1 << 20
    simg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F",
         "qcow2", tmp_path / "d.qcow2", "2M")
    assert qinfo(tmp_path / "d.qcow2", "-U")["backing-filename"] == \
        "gone.qcow2"


def map_runs(path):
    """qemu-img map as runs of (present, data, depth): host offsets and
    the zero flag (which follows holes in the host file, so the layout)
    ignored, adjacent equal runs merged."""
    runs = []
    for e in json.loads(run(qemu_img(), "map", "--output=json",
                            path).stdout):
        key = (e["present"], e["data"], e["depth"])
        if runs and runs[-1][0] == key:
            runs[-1][1] += e["length"]
        else:
            runs.append([key, e["length"]])
    return runs


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512",
                                  "cluster_size=16384,extended_l2=on",
                                  "cluster_size=4096,compat=0.10"])
def test_preallocation_matches_qemu(tmp_path, mode, opts):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    o = f"{opts},preallocation={mode}"
    simg("create", "-q", "-f", "qcow2", "-o", o, ours, "20M")
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", o, theirs, "20M")
    out = qcheck_clean(ours)
    assert out["allocated-clusters"] == out["total-clusters"]
    run(qemu_img(), "compare", ours, theirs)
    assert map_runs(ours) == map_runs(theirs)
    used = ours.stat().st_blocks * 512
    if mode == "metadata":
        assert used < 20 << 20
    else:
        assert used >= 20 << 20
    sio(ours, "write -P 0x44 5M 100k")
    qcheck_clean(ours)
    run(qemu_io(), "-f", "qcow2", "-c", "read -P 0x44 5M 100k", "-c",
        "read -P 0 0 5M", ours)


def test_preallocation_with_backing_needs_extended_l2(tmp_path):
    base = tmp_path / "base.qcow2"
    simg("create", "-q", "-f", "qcow2", base, "4M")
    run(qemu_io(), "-f", "qcow2", "-c", "write -P 5 0 4M", base)
    p = simg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "-o", "preallocation=metadata", tmp_path / "a.qcow2",
             check=False)
    assert p.returncode == 1 and "preallocation" in p.stderr
    assert not (tmp_path / "a.qcow2").exists()
    # With extended L2 the backing file shows through the reserved space.
    top = tmp_path / "b.qcow2"
    simg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         "-o", "cluster_size=16k,extended_l2=on,preallocation=metadata", top)
    qcheck_clean(top)
    sio(top, "write -P 6 1k 1k")
    p = run(qemu_io(), "-f", "qcow2", "-c", "read -P 5 0 1k", "-c",
            "read -P 6 1k 1k", "-c", "read -P 5 2k 1M", top)
    assert "Pattern verification failed" not in p.stdout


def test_preallocation_bad_mode(tmp_path):
    p = simg("create", "-f", "qcow2", "-o", "preallocation=lots",
             tmp_path / "x.qcow2", "1M", check=False)
    assert p.returncode == 1 and "preallocation" in p.stderr
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_over_an_image_in_use_is_refused(tmp_path, fmt):
    """Like qemu-img, create takes the image locks before truncating: a
    disk somebody has open (here qemu-io) is left exactly as it was."""
    import subprocess
    img = tmp_path / "busy.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", img, "16M")
    run(qemu_io(), "-f", "qcow2", "-c", "write -P 7 0 1M", img)
    holder = spawn([qemu_io(), "-f", "qcow2", "-c", "sleep 20000",
                               str(img)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        mine = f":{img.stat().st_ino} ".encode()
        wait_until(lambda: mine in open("/proc/locks", "rb").read(), 10,
                   0.05, what="qemu-io to take its locks")
        before = img.read_bytes()
        p = simg("create", "-f", fmt, img, "1G", check=False)
        assert p.returncode == 1
        assert 'Failed to get "write" lock' in p.stderr
        assert f"process {holder.pid}" in p.stderr
        assert img.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_strata_io_info_matches_qemu_io(tmp_path, opts):
    """strata-io's 'info' prints qemu-io's lines: cluster size, the vm state
    offset (the size rounded up to one L2 table's span) and the
    format-specific block."""
    img = tmp_path / "i.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", opts, img, "3G")
    ours = run(binary("strata-io"), "-c", "info", img).stdout
    theirs = run(qemu_io(), "-c", "info", img).stdout
    assert ours == theirs
