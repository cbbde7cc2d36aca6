"""strata-img convert against qemu-img convert: each case converts the
same input with both tools and compares the results with QEMU's tools:
content (qemu-img compare), consistency (qemu-img check), allocation
(qemu-img map: data, zero and holes, ignoring host offsets) and the
header (qemu-img info: format, size, backing fields).  Bad input must fail
as qemu-img does and leave every file as it was."""
import hashlib
import json
import os
import subprocess

import pytest

from harness import assert_progress_bar, binary, need, run, run_on_pty

QEMU_IMG = "qemu-img"


def strata_img():
    return binary("strata-img")


def qio(*args):
    run(need("qemu-io", "qemu-utils"), *args)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    """Sources: a 3-deep chain with overlapping writes, zero clusters,
    compressed clusters and a cluster of written zeros; a raw image with
    holes; a small odd-sized raw."""
    need(QEMU_IMG, "qemu-utils")
    d = tmp_path_factory.mktemp("convert")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", d / "base.qcow2", "12M")
    qio("-c", "write -P 1 0 3M", "-c", "write -c -P 7 4M 128k",
        "-c", "write -P 9 11M 1M", d / "base.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
        "-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2")
    qio("-c", "write -P 2 1M 1M", "-c", "write -z 2M 512k",
        "-c", "write -P 0 6M 64k", "-c", "write -P 3 6M 1k", d / "mid.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
        "qcow2", d / "top.qcow2")
    qio("-c", "write -P 4 1536k 64k", "-c", "write -z 11M 128k",
        "-c", "write -c -P 5 8M 64k", "-c", "write -P 6 9M 5k",
        "-c", "write -P 0 10M 64k", d / "top.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "raw", d / "r.raw", "5M")
    qio("-f", "raw", "-c", "write -P 8 1M 100k", "-c", "write -P 0 3M 1M",
        "-c", "write -P 8 4M 3k", d / "r.raw")
    with open(d / "odd.raw", "wb") as f:
        f.write(b"\x11" * 5000)
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", d / "new.qcow2", "4M")
    qio("-c", "write -P 12 0 4M", d / "new.qcow2")
    return d


def mapping(path, fmt):
    """qemu-img map without host offsets, adjacent equal entries merged.
    For raw, from 4 KiB on: QEMU's file driver allocates a new file's
    first block when it creates it (strata's does not)."""
    start = "4096" if fmt == "raw" else "0"
    out = json.loads(run(QEMU_IMG, "map", "--output=json", "-f", fmt,
                         f"--start-offset={start}", path).stdout)
    merged = []
    for e in out:
        e = {k: e[k] for k in ("start", "length", "depth", "zero", "data")}
        if merged and all(merged[-1][k] == e[k] for k in
                          ("depth", "zero", "data")):
            merged[-1]["length"] += e["length"]
        else:
            merged.append(e)
    return merged


def info(path):
    i = json.loads(run(QEMU_IMG, "info", "--output=json", path).stdout)
    return {k: i.get(k) for k in ("format", "virtual-size",
                                  "backing-filename",
                                  "backing-filename-format",
                                  "cluster-size")}


def both(d, args, srcs, ofmt="raw", compare_map=True):
    """Convert with both tools; check and compare; return the paths."""
    q, s = d / f"q-{os.getpid()}.out", d / f"s-{os.getpid()}.out"
    for p in (q, s):
        if p.exists():
            p.unlink()
    run(QEMU_IMG, "convert", *args, *srcs, q.name, cwd=d)
    run(strata_img(), "convert", *args, *srcs, s.name, cwd=d)
    run(QEMU_IMG, "compare", "-f", ofmt, "-F", ofmt, q, s)
    if ofmt == "qcow2":
        run(QEMU_IMG, "check", s)
    assert info(s) == info(q)
    if compare_map:
        assert mapping(s, ofmt) == mapping(q, ofmt)
    return q, s


@pytest.mark.parametrize("csize", ["512", "4k", "64k", "2M"])
def test_flatten_chain_cluster_sizes(imgs, csize):
    q, s = both(imgs, ["-O", "qcow2", "-o", f"cluster_size={csize}"],
                ["top.qcow2"], "qcow2")
    run(QEMU_IMG, "compare", "top.qcow2", s, cwd=imgs)


@pytest.mark.parametrize("args", [
    ["-O", "raw"],
    ["-O", "qcow2", "-S", "0"],
    ["-O", "raw", "-S", "0"],
    ["-O", "qcow2", "-S", "64k"],
    ["-O", "qcow2", "-S", "512"],
    ["-O", "qcow2", "-m", "1"],
    ["-O", "qcow2", "-m", "16", "-W"],
    ["-O", "qcow2", "-t", "none", "-T", "none"],
    ["-O", "qcow2", "-U", "-C"],
    ["-O", "qcow2", "-o", "size=1M"],
])
def test_flatten_options(imgs, args):
    ofmt = args[1]
    q, s = both(imgs, args, ["top.qcow2"], ofmt)
    run(QEMU_IMG, "compare", "-F", ofmt, "top.qcow2", s, cwd=imgs)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_output(imgs, ctype):
    # The host layout of compressed data differs; content, check and the
    # data/zero map must not.
    q, s = both(imgs, ["-O", "qcow2", "-c", "-o",
                       f"compression_type={ctype}"], ["top.qcow2"], "qcow2")
    chk = json.loads(run(QEMU_IMG, "check", "--output=json", s).stdout)
    qchk = json.loads(run(QEMU_IMG, "check", "--output=json", q).stdout)
    assert chk["compressed-clusters"] == qchk["compressed-clusters"] > 0
    out = run(QEMU_IMG, "info", s).stdout
    assert f"compression type: {ctype}" in out


def test_extended_l2_output(imgs):
    # strata's qcow2 allocates whole clusters where QEMU allocates
    # subclusters, so only content, check and header are compared.
    both(imgs, ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
         ["top.qcow2"], "qcow2", compare_map=False)


def test_compressed_small_clusters_and_odd_tail(imgs):
    both(imgs, ["-O", "qcow2", "-c", "-o", "cluster_size=4k"],
         ["r.raw", "odd.raw"], "qcow2")


def test_backing_B_copies_top_layer_only(imgs):
    # qemu-img copies only what the top image allocates; the rest shows
    # through from the new backing file.
    q, s = both(imgs, ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"],
                ["top.qcow2"], "qcow2")
    i = info(s)
    assert i["backing-filename"] == "base.qcow2"
    assert i["backing-filename-format"] == "qcow2"
    # Against another backing file the result is the top layer over it.
    both(imgs, ["-O", "qcow2", "-B", "new.qcow2", "-F", "qcow2", "-o",
                "cluster_size=4k"], ["mid.qcow2"], "qcow2")


def test_backing_from_o_option(imgs):
    # -o backing_file=...,backing_fmt=... works as -B/-F.
    q, s = both(imgs, ["-O", "qcow2", "-o",
                       "backing_file=base.qcow2,backing_fmt=qcow2"],
                ["top.qcow2"], "qcow2")
    assert info(s)["backing-filename"] == "base.qcow2"


def test_backing_B_same_chain_is_identical(imgs):
    q, s = both(imgs, ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2"],
                ["top.qcow2"], "qcow2")
    run(QEMU_IMG, "compare", "top.qcow2", s, cwd=imgs)


def test_multiple_sources(imgs):
    for ofmt in ("qcow2", "raw"):
        both(imgs, ["-O", ofmt], ["r.raw", "top.qcow2", "odd.raw",
                                  "mid.qcow2"], ofmt)


def test_raw_to_qcow2_and_back(imgs):
    q, s = both(imgs, ["-f", "raw", "-O", "qcow2"], ["r.raw"], "qcow2")
    os.replace(s, imgs / "r2.qcow2")
    both(imgs, ["-f", "qcow2", "-O", "raw"], ["r2.qcow2"], "raw")


@pytest.mark.parametrize("tz", [False, True])
def test_into_existing_image(imgs, tz):
    # -n writes into an image full of 12s; zeros of the source must be
    # written there (unless the target is declared zero).
    d = imgs
    srcs = ["r.raw"]
    outs = []
    for tool in (QEMU_IMG, strata_img()):
        out = d / f"n-{len(outs)}.qcow2"
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", out, "6M")
        if not tz:
            qio("-c", "write -P 12 0 6M", out)
        args = ["convert", "-n", "-O", "qcow2"] + (
            ["--target-is-zero"] if tz else [])
        run(tool, *args, *srcs, out.name, cwd=d)
        run(QEMU_IMG, "check", out)
        outs.append(out)
    run(QEMU_IMG, "compare", *outs)
    assert mapping(outs[1], "qcow2") == mapping(outs[0], "qcow2")
    # The first 5M equal the source.
    r = run(QEMU_IMG, "convert", "-O", "raw", outs[1], d / "n.raw")
    assert r.returncode == 0
    with open(d / "n.raw", "rb") as a, open(d / "r.raw", "rb") as b:
        assert a.read(5 << 20) == b.read()


def test_progress(imgs, tmp_path):
    # A bar with percent, rate and time left on a terminal; nothing in a
    # pipe (qemu-img writes its steps there too); never with -q.
    def out(*args):
        return subprocess.run([strata_img(), "convert", *args], cwd=imgs,
                              capture_output=True, check=True).stdout
    assert out("-p", "-O", "qcow2", "top.qcow2", tmp_path / "p.qcow2") == b""
    status, text = run_on_pty([strata_img(), "convert", "-p", "-O", "qcow2",
                               "top.qcow2", tmp_path / "p3.qcow2"], cwd=imgs)
    assert status == 0, text
    assert_progress_bar(text)
    status, text = run_on_pty([strata_img(), "convert", "-p", "-q", "-O",
                               "qcow2", "top.qcow2", tmp_path / "p2.qcow2"],
                              cwd=imgs)
    assert status == 0 and text == "", text


def digest(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


BAD = [
    (["-O", "qcow2", "nosuch.qcow2", "OUT"], "Could not open 'nosuch.qcow2'"),
    (["-O", "foo", "top.qcow2", "OUT"], "Unknown file format 'foo'"),
    (["-f", "foo", "top.qcow2", "OUT"], "Could not open 'top.qcow2'"),
    (["-n", "-O", "qcow2", "top.qcow2", "OUT"], "Could not open '"),
    (["-S", "abc", "top.qcow2", "OUT"], "Invalid buffer size"),
    (["-S", "1000", "top.qcow2", "OUT"], "Invalid buffer size"),
    (["-m", "0", "top.qcow2", "OUT"], "Invalid number of coroutines"),
    (["-m", "17", "top.qcow2", "OUT"], "Invalid number of coroutines"),
    (["-c", "-O", "raw", "top.qcow2", "OUT"], "Compression not supported"),
    (["--target-is-zero", "top.qcow2", "OUT"], "--target-is-zero requires"),
    (["top.qcow2"], "Must specify image file name"),
    (["-O", "qcow2", "-o", "cluster_size=1000", "top.qcow2", "OUT"],
     "Cluster size must be a power of two"),
    (["-O", "qcow2", "-o", "foo=bar", "top.qcow2", "OUT"],
     "Invalid parameter 'foo'"),
    (["-T", "bogus", "top.qcow2", "OUT"], "Invalid source cache option"),
    (["-t", "bogus", "top.qcow2", "OUT"], "Invalid cache option: bogus"),
    (["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "OUT"],
     "requires explicit backing format"),
    (["-O", "qcow2", "-o", "backing_file=base.qcow2", "top.qcow2", "OUT"],
     "requires explicit backing format"),
    (["-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "OUT"],
     "Backing file not supported for file format 'raw'"),
    (["-O", "qcow2", "-c", "-o", "preallocation=full", "top.qcow2", "OUT"],
     "Compression and preallocation"),
    (["-n", "-O", "raw", "top.qcow2", "small.raw"],
     "output file is smaller than input file"),
    (["-n", "-o", "cluster_size=4k", "top.qcow2", "small.raw"],
     "-o has no effect"),
    (["-O", "qcow2", "top.qcow2", "top.qcow2"], "Failed to get \"write\""),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_input(imgs, tmp_path, args, msg):
    d = tmp_path
    for f in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        (d / f).write_bytes((imgs / f).read_bytes())
    run(QEMU_IMG, "create", "-q", "-f", "raw", d / "small.raw", "1M")
    files = sorted(os.listdir(d))
    before = {f: digest(d / f) for f in files}
    for tool, name in ((QEMU_IMG, "qemu-img"), (strata_img(), "strata-img")):
        a = [x.replace("OUT", f"{name}.out") for x in args]
        p = run(tool, "convert", *a, check=False, cwd=d)
        assert p.returncode == 1, (name, p.stderr)
        assert msg in p.stderr, (name, p.stderr)
        assert p.stderr.startswith(f"{name}: ")
    # strata-img left nothing behind and changed nothing.
    assert not (d / "strata-img.out").exists()
    assert {f: digest(d / f) for f in files} == before


def test_bad_backing_leaves_no_file(imgs, tmp_path):
    for f in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        (tmp_path / f).write_bytes((imgs / f).read_bytes())
    p = run(strata_img(), "convert", "-O", "qcow2", "-B", "missing.qcow2",
            "-F", "qcow2", "-U", "top.qcow2", "o.qcow2", check=False,
            cwd=tmp_path)
    assert p.returncode == 1
    assert "Could not open backing file" in p.stderr
    assert not (tmp_path / "o.qcow2").exists()


def test_memory_bounded_on_large_image(tmp_path):
    # A 200 GiB sparse chain with data at both ends and in the middle:
    # peak RSS must stay far below 64 MiB (buffers are per thread, caches
    # bounded), and the result must equal qemu-img's.
    timer = need("/usr/bin/time", "time")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", tmp_path / "b.qcow2",
        "200G")
    qio("-c", "write -P 1 0 3M", "-c", "write -P 2 100G 5M",
        tmp_path / "b.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F",
        "qcow2", tmp_path / "t.qcow2")
    qio("-c", "write -P 3 1M 1M", "-c", "write -P 4 199G 2M",
        tmp_path / "t.qcow2")
    p = run(timer, "-f", "%M", strata_img(), "convert", "-m", "16",
            "-O", "qcow2", "t.qcow2", "s.qcow2", cwd=tmp_path)
    rss_kib = int(p.stderr.strip().splitlines()[-1])
    assert rss_kib < 64 * 1024, rss_kib
    run(QEMU_IMG, "convert", "-O", "qcow2", "t.qcow2", "q.qcow2",
        cwd=tmp_path)
    run(QEMU_IMG, "compare", tmp_path / "q.qcow2", tmp_path / "s.qcow2")
    assert mapping(tmp_path / "s.qcow2", "qcow2") == \
        mapping(tmp_path / "q.qcow2", "qcow2")


@pytest.mark.parametrize("seed", range(1, 9))
def test_random_chains(tmp_path, seed):
    # Random writes (compressed, data, zeros, written zeros) over a random
    # 2- or 3-deep chain of random cluster sizes, converted with random
    # -S and output cluster size: the same content and allocation as
    # qemu-img's.  Re-run one seed with -k "random_chains and SEED".
    import random
    rnd = random.Random(seed)
    size = 8 << 20
    depth = rnd.choice([2, 3])
    backing = None
    for i in range(depth):
        img = tmp_path / f"l{i}.qcow2"
        args = ["-o", f"cluster_size={rnd.choice(['512', '4k', '64k'])}"]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", *args, img, str(size))
        # Compressed writes first, on distinct clusters: QEMU cannot
        # compress into an allocated cluster.
        cmds = []
        for c in rnd.sample(range(size // 65536), rnd.randrange(0, 4)):
            cmds += ["-c", f"write -c -P {rnd.randrange(1, 255)} "
                     f"{c * 65536} 65536"]
        for _ in range(10):
            kind = rnd.choice(["data", "zero", "zdata"])
            off = rnd.randrange(0, size // 512 - 1) * 512
            length = min(rnd.randrange(1, 600) * 512, size - off)
            if kind == "data":
                cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {off} "
                         f"{length}"]
            elif kind == "zero":
                cmds += ["-c", f"write -z {off} {length}"]
            else:
                cmds += ["-c", f"write -P 0 {off} {length}"]
        qio(*cmds, img)
        backing = img.name
    sparse = rnd.choice(["0", "512", "4k", "64k"])
    csize = rnd.choice(["512", "4k", "64k", "1M"])
    ofmt = rnd.choice(["qcow2", "raw"])
    args = ["-O", ofmt, "-S", sparse]
    if ofmt == "qcow2":
        args += ["-o", f"cluster_size={csize}"]
    print("seed", seed, "depth", depth, "args", args)
    both(tmp_path, args, [backing], ofmt)
    run(QEMU_IMG, "compare", "-F", ofmt, backing, f"s-{os.getpid()}.out",
        cwd=tmp_path)
