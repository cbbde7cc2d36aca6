"""strata-img rebase against qemu-img rebase (7.2) as the oracle.

Each case runs the same command with both tools on byte-identical copies
of a generated chain and compares what QEMU's own tools see afterwards:
'qemu-img info' backing fields, 'qemu-img check', guest content with
'qemu-img compare' (against the image as it was before), and the header
extensions.  Bad input must give qemu-img's exit code and leave every file
byte-identical.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess

import pytest

from harness import (assert_progress_bar, binary, drop_qemu_progress, need,
                     run, run_on_pty)
from harness.qcow2 import KiB, MiB, create, qemu_check, qemu_img, qio
from harness.chains import make_mixed_chain, map_of


def strata_img():
    return binary("strata-img")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def info(path):
    """qemu-img info run in PATH's directory, so names print relative."""
    p = run(qemu_img(), "info", "--output=json", "-U", path.name,
            cwd=path.parent)
    return json.loads(p.stdout)


def backing_fields(path):
    i = info(path)
    return {k: i.get(k) for k in ("backing-filename",
                                  "backing-filename-format",
                                  "full-backing-filename")}


def check_alone(path):
    """qemu-img check of PATH without opening its backing file (which may
    not exist after -u)."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(path)}})
    p = run(qemu_img(), "check", "json:" + spec, check=False)
    assert p.returncode == 0 and "No errors were found" in p.stdout, (
        p.stdout, p.stderr)


def extensions(path):
    """[(type, data)] of the header extensions, in order."""
    with open(path, "rb") as f:
        h = f.read(64 * KiB)
    version, = struct.unpack(">I", h[4:8])
    off = struct.unpack(">I", h[100:104])[0] if version >= 3 else 72
    out = []
    while off + 8 <= len(h):
        t, n = struct.unpack(">II", h[off:off + 8])
        if t == 0:
            break
        out.append((t, h[off + 8:off + 8 + n]))
        off += 8 + (n + 7) // 8 * 8
    return out


def both(tmp_path, files, args, target):
    """Copy FILES into q/ and s/ under TMP_PATH, run 'rebase ARGS TARGET'
    with qemu-img in q/ and strata-img in s/; returns the two results."""
    res = {}
    for tool, d in ((qemu_img(), "q"), (strata_img(), "s")):
        os.makedirs(tmp_path / d, exist_ok=True)
        for f in files:
            shutil.copy(tmp_path / f, tmp_path / d / f)
        res[d] = run(tool, "rebase", *args, target, cwd=tmp_path / d,
                     check=False)
    return res["q"], res["s"]


def test_unsafe_matches_qemu(tmp_path):
    """-u only rewrites the header: same bytes as qemu-img for a new name
    and format, a raw format, and removal."""
    create(tmp_path / "base.qcow2", 4 * MiB)
    create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2")
    qio(tmp_path / "top.qcow2", ["write -P 7 64k 64k"])
    for args in (["-u", "-b", "other.qcow2", "-F", "qcow2"],
                 ["-u", "-b", "sub/dir/raw.img", "-F", "raw"],
                 ["-u", "-b", "", "-F", "qcow2"],
                 ["-u"]):
        q, s = both(tmp_path, ["top.qcow2"], args, "top.qcow2")
        assert (q.returncode, s.returncode) == (0, 0), (q.stderr, s.stderr)
        qf, sf = tmp_path / "q" / "top.qcow2", tmp_path / "s" / "top.qcow2"
        assert backing_fields(qf) == backing_fields(sf)
        assert sha(qf) == sha(sf), args
        check_alone(sf)


def test_unsafe_keeps_extensions(tmp_path):
    """Unknown header extensions and the feature table survive, in their
    order, through a change and a removal."""
    create(tmp_path / "t.qcow2", 1 * MiB)
    before = extensions(tmp_path / "t.qcow2")
    # An unknown (ignorable) extension after the feature table.
    with open(tmp_path / "t.qcow2", "r+b") as f:
        h = bytearray(f.read(4096))
        off = struct.unpack(">I", h[100:104])[0]
        for _ in before:
            n = struct.unpack(">I", h[off + 4:off + 8])[0]
            off += 8 + (n + 7) // 8 * 8
        h[off:off + 24] = struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0" \
            + bytes(8)
        f.seek(0)
        f.write(h)
    exts = extensions(tmp_path / "t.qcow2")
    assert exts[-1] == (0x12345678, b"hello")
    img = strata_img()
    run(img, "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
        cwd=tmp_path)
    after = extensions(tmp_path / "t.qcow2")
    assert after == [(0xE2792ACA, b"qcow2")] + exts
    assert backing_fields(tmp_path / "t.qcow2")["backing-filename"] \
        == "b.qcow2"
    run(img, "rebase", "-u", "-b", "", "t.qcow2", cwd=tmp_path)
    assert extensions(tmp_path / "t.qcow2") == exts
    qemu_check(tmp_path / "t.qcow2")


def test_unsafe_refusals(tmp_path):
    """A name that does not fit the first cluster, a missing -F, a bad
    format name, a missing image: qemu-img's exit code, files unchanged."""
    create(tmp_path / "s.qcow2", 1 * MiB, cluster_size=512)
    long = "y" * 400
    cases = [
        (["-u", "-b", long, "-F", "qcow2"], "s.qcow2", "fit"),
        (["-u", "-b", "x.qcow2"], "s.qcow2", "backing format must be"),
        (["-u", "-b", "x.qcow2", "-F", "bogus"], "s.qcow2", "bogus"),
        (["-u", "-b", "x.qcow2", "-F", "qcow2"], "nope.qcow2", "nope.qcow2"),
        (["-b", "x.qcow2", "-F", "qcow2", "a", "b"], "s.qcow2",
         "Expecting one image file name"),
        (["-F", "qcow2"], "s.qcow2", "Must specify backing file"),
        # -c comes from later qemu-img; 7.2 refuses it as unknown.
        (["-u", "-c", "-b", "x", "-F", "qcow2"], "s.qcow2",
         "Compression is not supported in unsafe mode"),
    ]
    for args, target, msg in cases:
        q, s = both(tmp_path, ["s.qcow2"], args, target)
        assert q.returncode == s.returncode == 1, (args, q.stderr, s.stderr)
        assert msg in s.stderr and s.stderr.count("\n") <= 2, s.stderr
        assert sha(tmp_path / "s" / "s.qcow2") == sha(tmp_path / "s.qcow2")


# ---- safe mode --------------------------------------------------------


def other_base(d, cs, size=None):
    """A standalone image unlike the chain's layers, partly equal."""
    create(d / "other.qcow2", size or max(4 * MiB, 16 * cs), cluster_size=cs)
    qio(d / "other.qcow2", [f"write -P 1 0 {2 * cs}",
                            f"write -P 2 {2 * cs} {cs}",
                            f"write -P 11 {6 * cs} {4 * cs}"])


def safe_case(tmp_path, cs, args, sub=""):
    """Run rebase ARGS on top.qcow2 (in SUB/ when given, from its parent)
    with both tools and compare the results with the oracle's and with
    the chain as it was."""
    chain = tmp_path / "chain" / sub if sub else tmp_path / "chain"
    for d in ("q", "s", "orig"):
        shutil.copytree(tmp_path / "chain", tmp_path / d)
    target = f"{sub}/top.qcow2" if sub else "top.qcow2"
    q = run(qemu_img(), "rebase", *args, target, cwd=tmp_path / "q",
            check=False)
    s = run(strata_img(), "rebase", *args, target, cwd=tmp_path / "s",
            check=False)
    assert q.returncode == s.returncode == 0, (q.stderr, s.stderr)
    assert s.stdout == q.stdout == ""
    at = (lambda d: tmp_path / d / sub) if sub else (lambda d: tmp_path / d)
    compare_images(at("s") / "top.qcow2", at("orig") / "top.qcow2")
    compare_images(at("s") / "top.qcow2", at("q") / "top.qcow2")
    qemu_check(at("s") / "top.qcow2")
    assert backing_fields(at("s") / "top.qcow2") == \
        backing_fields(at("q") / "top.qcow2")
    assert map_of(at("s") / "top.qcow2") == map_of(at("q") / "top.qcow2")
    assert chain.exists()


def compare_images(a, b):
    p = run(qemu_img(), "compare", a, b, check=False)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout}{p.stderr}"


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB])
@pytest.mark.parametrize("args", [["-b", "base.qcow2", "-F", "qcow2"],
                                  ["-b", "other.qcow2", "-F", "qcow2"],
                                  ["-b", ""]],
                         ids=["onto-base", "onto-other", "detach"])
def test_safe_matches_qemu(tmp_path, cs, args):
    make_mixed_chain(tmp_path / "chain", cs)
    other_base(tmp_path / "chain", cs)
    safe_case(tmp_path, cs, args)


def test_safe_big_clusters_and_shorter_base(tmp_path):
    """2 MiB clusters, a new base shorter than the image (it reads as
    zeros past its end)."""
    cs = 2 * MiB
    make_mixed_chain(tmp_path / "chain", cs)
    other_base(tmp_path / "chain", cs, size=10 * cs)
    safe_case(tmp_path, cs, ["-b", "other.qcow2", "-F", "qcow2"])


def test_safe_relative_to_image_dir(tmp_path):
    """-b is relative to the image's directory, not to the cwd; -p."""
    make_mixed_chain(tmp_path / "chain" / "sub", 64 * KiB)
    other_base(tmp_path / "chain" / "sub", 64 * KiB)
    safe_case(tmp_path, 64 * KiB, ["-q", "-p", "-b", "other.qcow2", "-F",
                                   "qcow2"], sub="sub")


def test_safe_no_old_backing(tmp_path):
    """An image without a backing file put on one: where the new base has
    data and the image has none, zeros are written."""
    d = tmp_path / "chain"
    d.mkdir()
    create(d / "top.qcow2", 4 * MiB)
    qio(d / "top.qcow2", ["write -P 3 64k 64k"])
    other_base(d, 64 * KiB)
    safe_case(tmp_path, 64 * KiB, ["-b", "other.qcow2", "-F", "qcow2"])


@pytest.mark.parametrize("args,msg", [
    (["-b", "nope.qcow2", "-F", "qcow2"],
     "Could not open new backing file 'nope.qcow2'"),
    (["-b", "junk.img", "-F", "qcow2"],
     "Could not open new backing file 'junk.img'"),
    (["-b", "other.qcow2"], "backing format must be specified"),
    (["-b", "other.qcow2", "-F", "qcow2", "-T", "bogus"],
     "Invalid source cache option: bogus"),
])
def test_safe_refusals(tmp_path, args, msg):
    """A new base that cannot be opened, no -F: exit 1, one line, every
    file unchanged (qemu-img 7.2 copies data before failing on a missing
    -F; strata checks first)."""
    d = tmp_path / "chain"
    make_mixed_chain(d, 64 * KiB)
    other_base(d, 64 * KiB)
    (d / "junk.img").write_bytes(b"not an image" * 100)
    shutil.copytree(d, tmp_path / "q")
    before = {f: sha(d / f) for f in os.listdir(d)}
    q = run(qemu_img(), "rebase", *args, "top.qcow2", cwd=tmp_path / "q",
            check=False)
    s = run(strata_img(), "rebase", *args, "top.qcow2", cwd=d, check=False)
    assert q.returncode == s.returncode == 1, (q.stderr, s.stderr)
    assert msg in s.stderr and s.stderr.count("\n") == 1, s.stderr
    assert {f: sha(d / f) for f in os.listdir(d)} == before


def test_safe_old_backing_missing(tmp_path):
    d = tmp_path / "chain"
    make_mixed_chain(d, 64 * KiB)
    other_base(d, 64 * KiB)
    os.unlink(d / "mid.qcow2")
    before = sha(d / "top.qcow2")
    s = run(strata_img(), "rebase", "-b", "other.qcow2", "-F", "qcow2",
            "top.qcow2", cwd=d, check=False)
    assert s.returncode == 1 and "Could not open 'top.qcow2'" in s.stderr
    assert sha(d / "top.qcow2") == before


def test_crash_during_safe_rebase(tmp_path):
    """Power failure before each write or flush of the image during a safe
    rebase (losing none, all, some or all but the last unflushed writes):
    the image shows the same guest content on whichever backing file its
    header names, and check finds at worst leaks."""
    cc = need("cc", "gcc")
    shim = tmp_path / "crash.so"
    run(cc, "-shared", "-fPIC", "-O1", "-o", shim,
        os.path.join(os.path.dirname(__file__), "qcow2_crash_shim.c"), "-ldl")
    d = tmp_path / "chain"
    make_mixed_chain(d, 64 * KiB)
    other_base(d, 64 * KiB)
    shutil.copytree(d, tmp_path / "orig")
    s = tmp_path / "s"
    img = strata_img()
    asan = run("sh", "-c", f"ldd {img} | grep -o '/[^ ]*libasan[^ ]*'"
               " || true").stdout.strip()

    def crashing(**kw):
        env = dict(os.environ, CRASH_FILE=os.path.realpath(s / "top.qcow2"),
                   LD_PRELOAD=":".join(([asan] if asan else [])
                                       + [str(shim)]))
        env.update({k: str(v) for k, v in kw.items()})
        return run(img, "rebase", "-b", "other.qcow2", "-F", "qcow2",
                   "top.qcow2", cwd=s, check=False, env=env)

    shutil.copytree(d, s)
    count = tmp_path / "count"
    assert crashing(CRASH_COUNT=count).returncode == 0
    events = int(count.read_text().split()[0])
    assert events >= 4
    names = set()
    for n in range(1, events + 1):
        shutil.rmtree(s)
        shutil.copytree(d, s)
        p = crashing(CRASH_AT=n, CRASH_LOSE=n % 4)
        assert p.returncode == 99, (n, p.returncode, p.stderr)
        compare_images(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
        c = run(qemu_img(), "check", s / "top.qcow2", check=False)
        assert c.returncode in (0, 3), (n, c.stdout, c.stderr)
        names.add(backing_fields(s / "top.qcow2")["backing-filename"])
    # Some crash points come before the header rewrite, some after.
    assert names == {"mid.qcow2", "other.qcow2"}, names


def test_safe_progress(tmp_path):
    """-p: strata-img's bar on a terminal, nothing in a pipe (where
    qemu-img writes its steps)."""
    make_mixed_chain(tmp_path / "chain", 64 * KiB)
    other_base(tmp_path / "chain", 64 * KiB)
    outs = {}
    for tool, d in ((qemu_img(), "q"), (strata_img(), "s")):
        shutil.copytree(tmp_path / "chain", tmp_path / d)
        p = subprocess.run([tool, "rebase", "-p", "-b", "other.qcow2", "-F",
                            "qcow2", "top.qcow2"], cwd=tmp_path / d,
                           capture_output=True)
        assert p.returncode == 0, p.stderr
        outs[d] = p.stdout
    assert outs["s"] == drop_qemu_progress(outs["q"]) == b""
    compare_images(tmp_path / "q" / "top.qcow2", tmp_path / "s" / "top.qcow2")
    shutil.copytree(tmp_path / "chain", tmp_path / "t")
    status, out = run_on_pty([strata_img(), "rebase", "-p", "-b",
                              "other.qcow2", "-F", "qcow2", "top.qcow2"],
                             cwd=tmp_path / "t")
    assert status == 0, out
    assert_progress_bar(out)


def test_unsafe_first_cluster_boundary(tmp_path):
    """Names around the largest that fits a 512-byte first cluster, with
    and without a backing format already there: the same verdict and the
    same bytes as qemu-img."""
    create(tmp_path / "p.qcow2", 1 * MiB, cluster_size=512)
    codes = set()
    for start in ("", "x" * 360):
        if start:
            run(qemu_img(), "rebase", "-u", "-b", start, "-F", "qcow2",
                tmp_path / "p.qcow2")
        for n in range(372, 382):
            for d in ("q", "s"):
                shutil.copy(tmp_path / "p.qcow2", tmp_path / f"{d}.qcow2")
            args = ["rebase", "-u", "-b", "y" * n, "-F", "qcow2"]
            q = run(qemu_img(), *args, tmp_path / "q.qcow2", check=False)
            s = run(strata_img(), *args, tmp_path / "s.qcow2", check=False)
            assert q.returncode == s.returncode, (n, q.stderr, s.stderr)
            assert sha(tmp_path / "q.qcow2") == sha(tmp_path / "s.qcow2"), n
            codes.add(s.returncode)
    assert codes == {0, 1}, "the boundary was not crossed"


@pytest.mark.parametrize("cs", [64 * KiB, 2 * MiB])
def test_safe_compressed(tmp_path, cs):
    """-c (as later qemu-img): the clusters rebase writes are compressed,
    the guest content is unchanged and the image passes check."""
    d = tmp_path / "chain"
    make_mixed_chain(d, cs)
    other_base(d, cs)
    shutil.copytree(d, tmp_path / "orig")
    run(strata_img(), "rebase", "-c", "-b", "other.qcow2", "-F", "qcow2",
        "top.qcow2", cwd=d)
    compare_images(d / "top.qcow2", tmp_path / "orig" / "top.qcow2")
    p = run(qemu_img(), "check", d / "top.qcow2")
    assert "No errors were found" in p.stdout
    pct = float(p.stdout.split("fragmented, ")[1].split("%")[0])
    assert pct > 0, p.stdout
    assert backing_fields(d / "top.qcow2")["backing-filename"] \
        == "other.qcow2"


def test_safe_compressed_needs_qcow2(tmp_path):
    d = tmp_path
    create(d / "b.qcow2", 1 * MiB)
    run(qemu_img(), "create", "-q", "-f", "raw", d / "r.img", "1M")
    before = sha(d / "r.img")
    s = run(strata_img(), "rebase", "-f", "raw", "-c", "-b", "b.qcow2",
            "-F", "qcow2", "r.img", cwd=d, check=False)
    assert s.returncode == 1
    assert "Compression not supported for this file format" in s.stderr
    assert sha(d / "r.img") == before
