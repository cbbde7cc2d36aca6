"""strata-img commit against qemu-img commit (7.2) as the oracle.

Each case builds a 3-deep chain with qemu-io (overlapping writes, zero
clusters from 'write -z', a compressed cluster from 'write -c', an
unaligned write), copies it twice, runs the same commit with both tools
and compares what QEMU's tools see: every layer's content with 'qemu-img
compare', 'qemu-img check', the backing fields of 'qemu-img info', and
the allocation map of the top ('qemu-img map' without host offsets).  The
top's guest view must also equal the pristine chain's.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from harness import (assert_progress_bar, binary, drop_qemu_progress, need,
                    run, run_on_pty, spawn)
from harness.chains import make_mixed_chain, map_of
from harness.qcow2 import KiB, MiB, create, qemu_check, qemu_img, qio

LAYERS = ("base.qcow2", "mid.qcow2", "top.qcow2")


def strata_img():
    return binary("strata-img")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def copies(tmp_path, names=("q", "s", "orig")):
    for n in names:
        shutil.copytree(tmp_path / "chain", tmp_path / n)


def backing_fields(path):
    p = run(qemu_img(), "info", "--output=json", path.name, cwd=path.parent)
    i = json.loads(p.stdout)
    return {k: i.get(k) for k in ("backing-filename",
                                  "backing-filename-format", "virtual-size")}


def compare(a, b):
    p = run(qemu_img(), "compare", a, b, check=False)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout}{p.stderr}"


def both_commit(tmp_path, args):
    q = run(qemu_img(), "commit", *args, "top.qcow2", cwd=tmp_path / "q",
            check=False)
    s = run(strata_img(), "commit", *args, "top.qcow2", cwd=tmp_path / "s",
            check=False)
    return q, s


def assert_same_result(tmp_path):
    q, s, o = tmp_path / "q", tmp_path / "s", tmp_path / "orig"
    compare(s / "top.qcow2", o / "top.qcow2")
    for name in LAYERS:
        compare(q / name, s / name)
        qemu_check(s / name)
    assert backing_fields(s / "top.qcow2") == backing_fields(q / "top.qcow2")
    assert map_of(s / "top.qcow2") == map_of(q / "top.qcow2")
    assert backing_fields(s / "base.qcow2") == \
        backing_fields(q / "base.qcow2")


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("args", [[], ["-d"], ["-b", "base.qcow2"],
                                  ["-b", "mid.qcow2"]],
                         ids=["empty", "d", "b-base", "b-mid"])
def test_commit_matches_qemu(tmp_path, cs, args):
    if cs == 2 * MiB and args in (["-d"], ["-b", "mid.qcow2"]):
        pytest.skip("covered at the smaller cluster sizes; keeps it fast")
    make_mixed_chain(tmp_path / "chain", cs)
    copies(tmp_path)
    q, s = both_commit(tmp_path, args)
    assert q.returncode == s.returncode == 0, (q.stderr, s.stderr)
    assert s.stdout == q.stdout == "Image committed.\n"
    assert_same_result(tmp_path)
    if not args:
        # Emptied: nothing of the top's own is left mapped.
        assert all(e["depth"] > 0 for e in map_of(tmp_path / "s" /
                                                   "top.qcow2"))
        # ... and the file is cut after its last used cluster, as
        # qemu-img cuts it (give or take the emptied L2 tables kept).
        qs = os.path.getsize(tmp_path / "q" / "top.qcow2")
        ss = os.path.getsize(tmp_path / "s" / "top.qcow2")
        assert ss <= qs + 4 * cs, (ss, qs)


@pytest.mark.parametrize("opts", [{"compat": "0.10"},
                                  {"extended_l2": "on"}],
                         ids=["v2", "extl2"])
def test_commit_other_layouts(tmp_path, opts):
    make_mixed_chain(tmp_path / "chain", 64 * KiB, **opts)
    copies(tmp_path)
    q, s = both_commit(tmp_path, [])
    assert q.returncode == s.returncode == 0, (q.stderr, s.stderr)
    assert_same_result(tmp_path)


def test_commit_grows_base(tmp_path):
    """A top larger than its base: the base grows to the top's size."""
    make_mixed_chain(tmp_path / "chain", 64 * KiB, top_size=6 * MiB)
    copies(tmp_path)
    q, s = both_commit(tmp_path, [])
    assert q.returncode == s.returncode == 0, (q.stderr, s.stderr)
    assert_same_result(tmp_path)
    assert backing_fields(tmp_path / "s" / "mid.qcow2")["virtual-size"] \
        == 6 * MiB


def test_commit_top_with_snapshot(tmp_path):
    """An internal snapshot shares the top's L2 tables and clusters:
    emptying drops only the active image's references."""
    make_mixed_chain(tmp_path / "chain", 64 * KiB)
    run(qemu_img(), "snapshot", "-c", "s1", tmp_path / "chain" / "top.qcow2")
    copies(tmp_path)
    q, s = both_commit(tmp_path, [])
    assert q.returncode == s.returncode == 0, (q.stderr, s.stderr)
    assert_same_result(tmp_path)
    for d in ("s", "orig"):
        run(qemu_img(), "snapshot", "-a", "s1", tmp_path / d / "top.qcow2")
    compare(tmp_path / "s" / "top.qcow2", tmp_path / "orig" / "top.qcow2")


def test_progress_and_quiet(tmp_path):
    """-p draws a bar with percent, rate and time left on a terminal and
    nothing into a pipe (where qemu-img writes its steps); -q silences the
    message too."""
    make_mixed_chain(tmp_path / "chain", 64 * KiB)
    copies(tmp_path, ("q", "s", "t"))
    q = subprocess.run([qemu_img(), "commit", "-p", "top.qcow2"],
                       cwd=tmp_path / "q", capture_output=True)
    s = subprocess.run([strata_img(), "commit", "-p", "top.qcow2"],
                       cwd=tmp_path / "s", capture_output=True)
    assert q.returncode == s.returncode == 0, s.stderr
    assert s.stdout == drop_qemu_progress(q.stdout) == b"Image committed.\n"
    status, out = run_on_pty([strata_img(), "commit", "-p", "top.qcow2"],
                             cwd=tmp_path / "t")
    assert status == 0, out
    assert_progress_bar(out)
    assert out.endswith("Image committed.\r\n"), repr(out)
    q, s = both_commit(tmp_path, ["-q", "-p"])
    assert s.returncode == 0 and s.stdout == q.stdout == ""


@pytest.mark.parametrize("args,target,msg", [
    (["-b", "nope.qcow2"], "top.qcow2", "Did not find 'nope.qcow2' in the "
                                        "backing chain of 'top.qcow2'"),
    (["-b", "top.qcow2"], "top.qcow2", "Did not find"),
    ([], "base.qcow2", "Image does not have a backing file"),
    ([], "missing.qcow2", "Could not open 'missing.qcow2'"),
    (["-r", "1x"], "top.qcow2", "Invalid rate limit"),
    (["-t", "bogus"], "top.qcow2", "Invalid cache option: bogus"),
    (["-f", "raw"], "top.qcow2", "Image does not have a backing file"),
    ([], "", "Expecting one image file name"),
    (["-x"], "top.qcow2", "unrecognized option '-x'"),
    (["-b"], "", "missing argument for option '-b'"),
])
def test_bad_input(tmp_path, args, target, msg):
    make_mixed_chain(tmp_path / "chain", 64 * KiB)
    copies(tmp_path, ("q", "s"))
    before = {n: sha(tmp_path / "s" / n) for n in LAYERS}
    tail = [target] if target else []
    q = run(qemu_img(), "commit", *args, *tail, cwd=tmp_path / "q",
            check=False)
    s = run(strata_img(), "commit", *args, *tail, cwd=tmp_path / "s",
            check=False)
    assert q.returncode == s.returncode == 1, (q.stderr, s.stderr)
    assert msg in s.stderr, s.stderr
    assert s.stderr.splitlines()[0].startswith("strata-img: ")
    assert {n: sha(tmp_path / "s" / n) for n in LAYERS} == before


def test_rate_limit(tmp_path):
    """-r 1M over ~1.2 MiB of data takes about a second; unlimited does
    not."""
    d = tmp_path / "chain"
    d.mkdir()
    create(d / "base.qcow2", 4 * MiB)
    create(d / "top.qcow2", 4 * MiB, backing="base.qcow2")
    qio(d / "top.qcow2", ["write -P 7 0 1280k"])
    copies(tmp_path, ("s", "orig"))
    t0 = time.monotonic()
    run(strata_img(), "commit", "-q", "-r", "1M", "top.qcow2",
        cwd=tmp_path / "s")
    assert time.monotonic() - t0 >= 0.9
    compare(tmp_path / "s" / "base.qcow2", tmp_path / "orig" / "top.qcow2")


def test_killed_commit_reruns(tmp_path):
    """kill -9 part-way through a rate-limited commit, then run it again:
    the content is right and every image passes check."""
    d = tmp_path / "chain"
    make_mixed_chain(d, 64 * KiB)
    qio(d / "top.qcow2", ["write -P 10 1m 2m"])
    copies(tmp_path, ("s", "orig"))
    proc = spawn([strata_img(), "commit", "-r", "512k",
                             "top.qcow2"], cwd=tmp_path / "s",
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        assert proc.poll() is None, "commit finished before the kill"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    s = tmp_path / "s"
    compare(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
    # Part of the data reached mid already.
    p = run(qemu_img(), "compare", s / "mid.qcow2",
            tmp_path / "orig" / "mid.qcow2", check=False)
    assert p.returncode == 1, "nothing was copied before the kill"
    run(strata_img(), "commit", "top.qcow2", cwd=s)
    compare(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
    compare(s / "mid.qcow2", tmp_path / "orig" / "top.qcow2")
    for name in LAYERS:
        qemu_check(s / name)


@pytest.fixture(scope="module")
def crash_shim(tmp_path_factory):
    """qcow2_crash_shim.c, built: stops a process before its Nth write or
    flush of $CRASH_FILE, optionally losing unflushed writes."""
    cc = need("cc", "gcc")
    out = tmp_path_factory.mktemp("shim") / "crash.so"
    run(cc, "-shared", "-fPIC", "-O1", "-o", out,
        os.path.join(os.path.dirname(__file__), "qcow2_crash_shim.c"), "-ldl")
    return str(out)


def crashing_commit(shim, d, target="top.qcow2", **kw):
    """strata-img commit of D/top.qcow2, crashing on writes to TARGET."""
    img = strata_img()
    env = dict(os.environ, CRASH_FILE=os.path.realpath(d / target))
    asan = run("sh", "-c", f"ldd {img} | grep -o '/[^ ]*libasan[^ ]*'"
               " || true").stdout.strip()
    env["LD_PRELOAD"] = ":".join(([asan] if asan else []) + [shim])
    env.update({k: str(v) for k, v in kw.items()})
    return run(img, "commit", "top.qcow2", cwd=d, check=False, env=env)


def test_crash_while_emptying(tmp_path, crash_shim):
    """Power failure before each write or flush of the top while it is
    emptied (losing none, all, some or all but the last unflushed
    writes): the top still reads as before, check finds at worst leaks,
    and a re-run finishes the commit."""
    d = tmp_path / "chain"
    d.mkdir()
    create(d / "base.qcow2", 2 * MiB, cluster_size=64 * KiB)
    create(d / "top.qcow2", 2 * MiB, backing="base.qcow2",
           cluster_size=64 * KiB)
    qio(d / "base.qcow2", ["write -P 1 0 1m"])
    qio(d / "top.qcow2", ["write -P 2 64k 192k", "write -z 512k 64k",
                          "write -c -P 3 1m 64k", "write -P 4 1536k 64k"])
    copies(tmp_path, ("orig",))
    s = tmp_path / "s"
    shutil.copytree(d, s)
    count = tmp_path / "count"
    p = crashing_commit(crash_shim, s, CRASH_COUNT=count)
    assert p.returncode == 0, p.stderr
    events = int(count.read_text().split()[0])
    assert events >= 6, "emptying the top wrote too little to test"
    for n in range(1, events + 1):
        shutil.rmtree(s)
        shutil.copytree(d, s)
        p = crashing_commit(crash_shim, s, CRASH_AT=n, CRASH_LOSE=n % 4)
        assert p.returncode == 99, (n, p.returncode, p.stderr)
        compare(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
        c = run(qemu_img(), "check", s / "top.qcow2", check=False)
        assert c.returncode in (0, 3), (n, c.stdout, c.stderr)
        run(strata_img(), "commit", "-q", "top.qcow2", cwd=s)
        compare(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
        compare(s / "base.qcow2", tmp_path / "orig" / "top.qcow2")
        assert all(e["depth"] > 0 for e in map_of(s / "top.qcow2"))
        run(qemu_img(), "check", "-r", "leaks", s / "top.qcow2")
        qemu_check(s / "top.qcow2")


@pytest.mark.parametrize("form,ok", [("base.qcow2", True),
                                     ("ABS", True),
                                     ("./base.qcow2", True),
                                     ("sub/base.qcow2", False)])
def test_base_name_forms(tmp_path, form, ok):
    """-b is looked up as qemu-img does: the recorded name, or a path
    relative to the directory of the layer that names it (not the cwd)."""
    make_mixed_chain(tmp_path / "chain" / "sub", 64 * KiB)
    for d in ("q", "s"):
        shutil.copytree(tmp_path / "chain", tmp_path / d)
    res = []
    for tool, d in ((qemu_img(), "q"), (strata_img(), "s")):
        name = str(tmp_path / d / "sub" / "base.qcow2") if form == "ABS" \
            else form
        res.append(run(tool, "commit", "-q", "-b", name, "sub/top.qcow2",
                       cwd=tmp_path / d, check=False))
    assert [p.returncode for p in res] == ([0, 0] if ok else [1, 1]), res
    if ok:
        compare(tmp_path / "q" / "sub" / "base.qcow2",
                tmp_path / "s" / "sub" / "base.qcow2")


def test_crash_while_copying(tmp_path, crash_shim):
    """Power failure before writes and flushes of the base while the data
    is copied into it: the top still reads right, the base passes check
    (leaks allowed), and a re-run finishes."""
    d = tmp_path / "chain"
    make_mixed_chain(d, 64 * KiB)
    copies(tmp_path, ("orig",))
    s = tmp_path / "s"
    shutil.copytree(d, s)
    count = tmp_path / "count"
    env = {"CRASH_COUNT": count}
    p = crashing_commit(crash_shim, s, target="mid.qcow2", **env)
    assert p.returncode == 0, p.stderr
    events = int(count.read_text().split()[0])
    assert events >= 6
    for n in sorted(set(range(1, events + 1, max(1, events // 12)))):
        shutil.rmtree(s)
        shutil.copytree(d, s)
        p = crashing_commit(crash_shim, s, target="mid.qcow2", CRASH_AT=n,
                            CRASH_LOSE=n % 4)
        assert p.returncode == 99, (n, p.returncode, p.stderr)
        # (The last events, when the base is closed, come after the top
        # was emptied: compare the guest view, not the bytes.)
        compare(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
        c = run(qemu_img(), "check", s / "mid.qcow2", check=False)
        assert c.returncode in (0, 3), (n, c.stdout, c.stderr)
        run(strata_img(), "commit", "-q", "top.qcow2", cwd=s)
        compare(s / "top.qcow2", tmp_path / "orig" / "top.qcow2")
        compare(s / "mid.qcow2", tmp_path / "orig" / "top.qcow2")
