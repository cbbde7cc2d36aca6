"""strata-img measure against qemu-img measure: the same numbers, output,
messages and exit codes, for creation options alone (--size) and for real
source images (raw, qcow2, chains, zero and compressed clusters)."""
import json
import os

import pytest

from harness import binary, need, run

QEMU_IMG = "qemu-img"


def strata_img():
    return binary("strata-img")


def both(*args, cwd=None):
    """Run measure with both tools; return (qemu, strata) results."""
    need(QEMU_IMG, "qemu-utils")
    q = run(QEMU_IMG, "measure", *args, check=False, cwd=cwd)
    s = run(strata_img(), "measure", *args, check=False, cwd=cwd)
    return q, s


def assert_same(*args, cwd=None):
    q, s = both(*args, cwd=cwd)
    assert s.returncode == q.returncode, (args, q.stderr, s.stderr)
    assert s.stdout == q.stdout, args
    return q


SIZE_OPTS = [
    "",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "extended_l2=on,cluster_size=2M,preallocation=metadata",
    "preallocation=metadata",
    "preallocation=falloc,cluster_size=8k",
    "preallocation=full",
    "refcount_bits=1",
    "refcount_bits=64,cluster_size=512",
    "refcount_bits=8,cluster_size=4k",
    "compat=0.10",
    "compat=1.1,lazy_refcounts=on",
    "compression_type=zstd",
    "backing_file=base.qcow2",
    "backing_file=x,preallocation=full",
]


@pytest.mark.parametrize("opts", SIZE_OPTS)
@pytest.mark.parametrize("size", ["0", "1000", "1G", "100T"])
def test_measure_size_matrix_qcow2(opts, size):
    args = ["--size", size, "-O", "qcow2", "--output=json"]
    if opts:
        args += ["-o", opts]
    q = assert_same(*args)
    if q.returncode == 0:
        assert json.loads(q.stdout)["fully-allocated"] > 0


@pytest.mark.parametrize("size", ["0", "1000", "1G", "7T"])
def test_measure_size_raw_human(size):
    assert_same("--size", size)
    assert_same("--size", size, "-O", "raw", "-o", "preallocation=full")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source images: raw with holes, qcow2 with data/zero/compressed
    clusters, a v2 qcow2, and a three-deep chain."""
    need(QEMU_IMG, "qemu-utils")
    qio = need("qemu-io", "qemu-utils")
    d = tmp_path_factory.mktemp("measure")
    run(QEMU_IMG, "create", "-q", "-f", "raw", d / "r.raw", "10M")
    run(qio, "-f", "raw", "-c", "write -P 1 1M 100k", "-c",
        "write -P 2 5M 3k", d / "r.raw")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", d / "q.qcow2", "64M")
    run(qio, "-c", "write -P 1 0 5M", "-c", "write -z 8M 2M", "-c",
        "write -P 3 20M 4k", "-c", "write -c -P 4 30M 64k", "-c",
        "write -P 5 40M 70k", d / "q.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "compat=0.10",
        d / "v2.qcow2", "10M")
    run(qio, "-c", "write -P 1 3M 1M", d / "v2.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", d / "base.qcow2", "32M")
    run(qio, "-c", "write -P 1 0 8M", d / "base.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
        "qcow2", d / "mid.qcow2")
    run(qio, "-c", "write -z 0 2M", "-c", "write -P 2 12M 1M",
        d / "mid.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
        "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    run(qio, "-c", "write -P 3 1M 4k", "-c", "write -P 3 30M 100k",
        d / "top.qcow2")
    return d


SRC_OPTS = ["", "cluster_size=4k", "cluster_size=2M", "extended_l2=on",
            "preallocation=full", "backing_file=base.qcow2", "compat=0.10",
            "refcount_bits=1,cluster_size=1k"]


@pytest.mark.parametrize("opts", SRC_OPTS)
@pytest.mark.parametrize("src", ["r.raw", "q.qcow2", "v2.qcow2",
                                 "top.qcow2", "mid.qcow2"])
@pytest.mark.parametrize("out", ["human", "json"])
def test_measure_source_images(sources, src, opts, out):
    args = ["-O", "qcow2", f"--output={out}", src]
    if opts:
        args += ["-o", opts]
    q = assert_same(*args, cwd=sources)
    assert q.returncode == 0


def test_measure_bitmaps_field(sources):
    # qemu-img prints "bitmaps" only for a qcow2 v3 source and output.
    q = assert_same("-O", "qcow2", "--output=json", "q.qcow2", cwd=sources)
    assert "bitmaps" in json.loads(q.stdout)
    q = assert_same("-O", "qcow2", "--output=json", "v2.qcow2", cwd=sources)
    assert "bitmaps" not in json.loads(q.stdout)
    q = assert_same("-O", "qcow2", "-f", "raw", "--output=json", "q.qcow2",
                    cwd=sources)
    assert "bitmaps" not in json.loads(q.stdout)


def test_measure_source_raw_output(sources):
    for src in ["r.raw", "q.qcow2", "top.qcow2"]:
        assert_same(src, cwd=sources)
        assert_same("-O", "raw", "--output=json", src, cwd=sources)


@pytest.mark.parametrize("args", [
    [],
    ["--size", "1G", "q.qcow2"],
    ["q.qcow2", "r.raw"],
    ["--size", "abc"],
    ["--size", "-1"],
    ["--size", "8E"],
    ["--output=xml", "--size", "1G"],
    ["-O", "qcow2", "--size", "1G", "-o", "cluster_size=1000"],
    ["-O", "qcow2", "--size", "1G", "-o", "refcount_bits=3"],
    ["-O", "qcow2", "--size", "1G", "-o", "preallocation=foo"],
    ["-O", "qcow2", "--size", "1G", "-o", "compat=1.2"],
    ["-O", "qcow2", "--size", "1G", "-o", "extended_l2=on,cluster_size=4k"],
    ["-O", "qcow2", "--size", "100T", "-o", "cluster_size=512"],
    ["-O", "qcow2", "--size", "1G", "-o", "lazy_refcounts=maybe"],
    ["-O", "qcow2", "--size", "1G", "-o", "foo=bar"],
    ["-O", "nosuchfmt", "--size", "1G"],
    ["-O", "qcow2", "missing.qcow2"],
])
def test_measure_bad_input(sources, args):
    q, s = both(*args, cwd=sources)
    assert q.returncode == 1 and s.returncode == 1, (q.stderr, s.stderr)
    assert s.stdout == "" and s.stderr.startswith("strata-img: ")
    # Same first message, except where strata names the option and format
    # in one line instead of two.
    qfirst = q.stderr.splitlines()[0].replace("qemu-img: ", "")
    sfirst = s.stderr.splitlines()[0].replace("strata-img: ", "")
    if "Invalid parameter" in qfirst or "Could not open" in qfirst:
        assert qfirst.split("'")[1] in sfirst
    else:
        assert sfirst == qfirst


def random_chain(d, rnd, size):
    """A 1- to 3-deep qcow2 chain with random cluster sizes and random
    data, zero, compressed and partial-cluster zero writes (which punch
    holes in the file and can make QEMU take the image for preallocated).
    Returns the top's name."""
    qio = need("qemu-io", "qemu-utils")
    backing = None
    for i in range(rnd.choice([1, 2, 3])):
        img = d / f"l{i}.qcow2"
        args = ["-o", f"cluster_size={rnd.choice(['512', '4k', '64k'])}"]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", *args, img, str(size))
        cmds = []
        for c in rnd.sample(range(size // 65536), rnd.randrange(0, 3)):
            cmds += ["-c", f"write -c -P 9 {c * 65536} 65536"]
        for _ in range(10):
            off = rnd.randrange(0, size // 512 - 1) * 512
            length = min(rnd.randrange(1, 600) * 512, size - off)
            kind = rnd.choice(["-P 7", "-z", "-P 0"])
            cmds += ["-c", f"write {kind} {off} {length}"]
        run(qio, *cmds, img)
        # Written back now, so the allocated size QEMU's preallocation
        # guess reads (st_blocks) stays the same for both tools: delayed
        # allocation can change it between the two runs otherwise.
        fd = os.open(img, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        backing = img.name
    return backing


@pytest.mark.parametrize("seed", range(1, 7))
def test_measure_random_chains(tmp_path, seed):
    import random
    rnd = random.Random(seed)
    top = random_chain(tmp_path, rnd, 8 << 20)
    for opts in ["cluster_size=512", "cluster_size=4k", "cluster_size=64k",
                 "extended_l2=on"]:
        assert_same("-O", "qcow2", "-o", opts, "--output=json", top,
                    cwd=tmp_path)
