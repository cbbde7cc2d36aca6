"""strata-nbd against qemu-nbd 7.2: the same command lines, run by both.

Each test starts qemu-nbd and strata-nbd with the same arguments on their
own copies of the same images (a raw file and a 3-deep qcow2 chain) and
compares what a user or an NBD client sees: exit codes and stderr (with
the program's name and the temporary directory masked), `nbdinfo --json`,
`--list`, `--map`, the errno of bad requests, and the server's life
(-t, --fork, --pid-file).  Where strata's NBD server answers otherwise on
purpose (choices proto.md leaves open), test_server_request_errnos says
which and asserts strata's answer.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from harness import binary, free_port, need, run, spawn, wait_until
from harness import procs

QEMU_NBD = shutil.which("qemu-nbd")
pytestmark = pytest.mark.skipif(not QEMU_NBD, reason="qemu-nbd not installed")

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """r.raw with data at 0 and 2M; base <- mid <- top with data at every
    depth, a zero cluster in mid and unallocated space."""
    d = tmp_path_factory.mktemp("template")
    qemu_img = need("qemu-img", "qemu-utils")
    qemu_io = need("qemu-io", "qemu-utils")
    with open(d / "r.raw", "wb") as f:
        f.truncate(SIZE)
        f.write(b"\1" * MiB)
        f.seek(2 * MiB)
        f.write(b"\2" * 4096)
    run(qemu_img, "create", "-q", "-f", "qcow2", d / "base.qcow2", str(SIZE))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 1M", d / "base.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
        "qcow2", d / "mid.qcow2")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 2 2M 1M",
        "-c", "write -z 4M 64k", d / "mid.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
        "qcow2", d / "top.qcow2")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 3 512k 1M", d / "top.qcow2")
    return d


def workdir(tmp_path, template, prog):
    """A copy of the images for PROG, so writes by one server cannot show
    in the other."""
    d = tmp_path / os.path.basename(prog)
    d.mkdir()
    for f in template.iterdir():
        run("cp", "--sparse=always", f, d / f.name)
    return d


def programs():
    return [QEMU_NBD, binary("strata-nbd")]


def expand(args, d):
    return [a.replace("{d}", str(d)) for a in args]


def masked(text, prog, d):
    """TEXT with the work directory and the program's name masked (getopt
    uses argv[0] as typed, our own messages its base name)."""
    return (text.replace(str(d), "D").replace(prog, "PROG")
            .replace(os.path.basename(prog), "PROG"))


class Server(procs.Server):
    """PROG serving with ARGS; stopped by its PID."""

    def __init__(self, prog, args, sock=None, port=None):
        super().__init__([prog, *args], sock=sock, port=port,
                         stdout=subprocess.PIPE)

    def wait(self, timeout=10):
        rc, err = super().wait(timeout)
        assert "Sanitizer" not in err, err
        return rc, err

    def stop(self):
        """SIGTERM; the exit status.  A sanitizer's report fails the test."""
        rc, err, _ = super().stop()
        assert "Sanitizer" not in (err or ""), err
        return rc


@pytest.fixture
def pair(tmp_path, template):
    """start(args) -> [(server, uri, dir)] for qemu-nbd then strata-nbd,
    each on a unix socket in its own copy of the images."""
    started = []

    def start(args, image="top.qcow2", name=""):
        out = []
        for prog in programs():
            d = workdir(tmp_path, template, prog)
            sock = str(d / "s")
            s = Server(prog, ["-k", sock, *expand(args, d), str(d / image)],
                       sock=sock)
            started.append(s)
            out.append((s, f"nbd+unix:///{name}?socket={sock}", d))
        return out

    yield start
    for s in started:
        s.stop()


# ---- the command line: exit codes and messages ---------------------------

LONG = "a" * 4097
CLI_ERRORS = [
    ["-f", "bogus", "-k", "{d}/s", "{d}/r.raw"],
    ["-f", "raw", "-k", "{d}/s", "{d}/missing"],
    ["-f", "qcow2", "-k", "{d}/s", "{d}/r.raw"],
    ["-k", "{d}/s", "{d}"],
    ["-p", "abc", "{d}/r.raw"],
    ["-p", "-1", "-b", "127.0.0.1", "{d}/r.raw"],
    ["-e", "abc", "-k", "{d}/s", "{d}/r.raw"],
    ["-e", "-1", "-k", "{d}/s", "{d}/r.raw"],
    ["-e", "3 ", "-k", "{d}/s", "{d}/r.raw"],
    ["-e", "", "-k", "{d}/s", "{d}/r.raw"],
    ["-e", "99999999999", "-k", "{d}/s", "{d}/r.raw"],
    ["--cache=bogus", "-k", "{d}/s", "{d}/r.raw"],
    ["--discard=bogus", "-k", "{d}/s", "{d}/r.raw"],
    ["--detect-zeroes=bogus", "-k", "{d}/s", "{d}/r.raw"],
    ["--detect-zeroes=unmap", "-k", "{d}/s", "{d}/r.raw"],
    # qemu-nbd looks at the discard mode given so far
    ["--detect-zeroes=unmap", "--discard=unmap", "-k", "{d}/s",
     "{d}/r.raw"],
    ["-k", "/nonexistent/dir/s", "{d}/r.raw"],
    ["-k", "/nonexistent/dir/s", "{d}/missing"],   # listens first
    ["-k", "relative.sock", "{d}/r.raw"],
    ["-k", "{d}/" + "a" * 120, "{d}/r.raw"],
    [],
    ["-k", "{d}/s"],
    ["-k", "{d}/s", "{d}/r.raw", "extra"],
    ["--bogus", "-k", "{d}/s", "{d}/r.raw"],
    ["-Z", "{d}/r.raw"],
    ["-f"],
    ["--discard"],
    ["-x", LONG, "-k", "{d}/s", "{d}/r.raw"],
    ["-D", LONG, "-k", "{d}/s", "{d}/r.raw"],
    ["--cache=bogus", "--discard=bogus"],           # the first one counts
    ["--pid-file", "/nonexistent/dir/pid", "-k", "{d}/s", "{d}/r.raw"],
    ["--fork", "-k", "/nonexistent/s", "{d}/r.raw"],
    ["--fork", "-f", "raw", "-k", "{d}/s", "{d}/missing"],
]


@pytest.mark.parametrize("args", CLI_ERRORS,
                         ids=lambda a: " ".join(a)[:50] or "no-args")
def test_cli_errors(tmp_path, template, args):
    seen = []
    for prog in programs():
        d = workdir(tmp_path, template, prog)
        p = subprocess.run([prog, *expand(args, d)], capture_output=True,
                           text=True, timeout=20, cwd=d)
        seen.append((p.returncode, p.stdout, masked(p.stderr, prog, d)))
    assert seen[0][0] != 0
    assert seen[1] == seen[0]


def test_cli_port_in_use(tmp_path, template):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    seen = []
    try:
        for prog in programs():
            d = workdir(tmp_path, template, prog)
            p = subprocess.run([prog, "-f", "raw", "-b", "127.0.0.1", "-p",
                                port, str(d / "r.raw")], capture_output=True,
                               text=True, timeout=20)
            seen.append((p.returncode, masked(p.stderr, prog, d)))
    finally:
        busy.close()
    assert seen[0][0] == 1 and "Address already in use" in seen[0][1]
    assert seen[1] == seen[0]


# ---- what clients see ----------------------------------------------------

# Left out of the comparison: qemu-nbd advertises a minimum block size of
# 512 for a probed raw image, strata 1 for every export.
SERVER_SIDE = ("block_size_minimum",)


def nbdinfo_json(uri, *extra):
    info = json.loads(run(need("nbdinfo", "libnbd-bin"), "--json", *extra,
                          uri).stdout)
    for e in info["exports"]:
        for k in SERVER_SIDE + ("uri",):    # the uri names our socket
            e.pop(k, None)
    return info


@pytest.mark.parametrize("args,image", [
    (["-f", "raw"], "r.raw"),
    (["-f", "qcow2"], "top.qcow2"),
    (["-f", "qcow2", "-A", "-x", "disk", "-D", "a 3-deep chain"],
     "top.qcow2"),
    (["-f", "qcow2", "-e", "2"], "top.qcow2"),
    (["-f", "qcow2", "-e", "0"], "top.qcow2"),
    (["-f", "qcow2", "-r", "-e", "2", "-A"], "top.qcow2"),
    (["-f", "qcow2", "--discard=unmap"], "top.qcow2"),
    (["-f", "qcow2", "--discard=ignore", "--detect-zeroes=on"], "top.qcow2"),
    (["-f", "qcow2", "--cache=writethrough"], "top.qcow2"),
    (["-f", "raw", "-n"], "r.raw"),
    ([], "top.qcow2"),                         # probed
])
def test_nbdinfo(pair, args, image):
    """Size, flags, block sizes, contexts, name and description."""
    name = "disk" if "-x" in args else ""
    (q, quri, _), (s, suri, _) = pair(["-t", *args], image, name)
    assert nbdinfo_json(suri) == nbdinfo_json(quri)
    assert (nbdinfo_json(suri.replace(f"/{name}?", "/?"), "--list")
            == nbdinfo_json(quri.replace(f"/{name}?", "/?"), "--list"))


@pytest.mark.parametrize("ro", [[], ["-r"]])
def test_maps(pair, ro):
    """base:allocation and qemu:allocation-depth over the chain, as
    nbdinfo --map prints them."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    (_, quri, _), (_, suri, _) = pair(["-t", "-f", "qcow2", "-A", *ro])
    for m in ("--map", "--map=qemu:allocation-depth"):
        want = run(nbdinfo, m, quri).stdout
        assert run(nbdinfo, m, suri).stdout == want
        assert len(want.splitlines()) > 2
    # and the same bytes, read by QEMU's client from both
    run(need("qemu-img", "qemu-utils"), "compare", "-f", "raw", "-F", "raw",
        quri, suri)


def nbd_errno(uri, *ops):
    """Run OPS (callables of a connected libnbd handle with strict mode
    off, so the server decides) and return their errno names or 'ok'."""
    import nbd
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    out = []
    for op in ops:
        try:
            op(h)
            out.append("ok")
        except nbd.Error as e:
            out.append(errno.errorcode.get(e.errno, str(e.errno)))
    h.shutdown()
    return out


def need_nbd_module():
    try:
        import nbd  # noqa: F401
    except ImportError:
        pytest.fail("python3-libnbd missing: install python3-libnbd")


# (count, offset) as libnbd's pread takes them
READS = {
    "past EOF": (512, SIZE),
    "straddling EOF": (1024, SIZE - 512),
    "far past EOF": (512, 1 << 62),
    "unaligned": (3, 1),
    "last byte": (1, SIZE - 1),
}


@pytest.mark.parametrize("ro", [[], ["-r"]])
def test_request_errors(pair, ro):
    need_nbd_module()
    (_, quri, _), (_, suri, _) = pair(["-t", "-f", "qcow2", *ro])
    ops = [lambda h, c=c, o=o: h.pread(c, o) for c, o in READS.values()]
    ops += [lambda h: h.block_status(512, SIZE, lambda *a: 0),
            lambda h: h.block_status(0, 0, lambda *a: 0),
            lambda h: h.flush()]
    want = nbd_errno(quri, *ops)
    assert nbd_errno(suri, *ops) == want
    assert want[0] == "EINVAL" and want[3] == "ok"


# ---- the server's life ---------------------------------------------------

def test_exits_after_last_client(pair):
    """Without -t both serve one client and exit 0, socket removed."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    for s, uri, d in pair(["-f", "qcow2"]):
        run(nbdinfo, "--size", uri)
        rc, err = s.wait()
        assert rc == 0, err
        assert not (d / "s").exists()


def test_persistent(pair):
    """With -t both stay after the client left; SIGTERM ends them with 0."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    for s, uri, d in pair(["-t", "-f", "qcow2"]):
        run(nbdinfo, "--size", uri)
        run(nbdinfo, "--size", uri)
        time.sleep(0.2)
        assert s.proc.poll() is None
        assert s.stop() == 0
        assert not (d / "s").exists()


@pytest.mark.parametrize("shared,waits", [("1", True), ("2", False)])
def test_shared_limit(pair, shared, waits):
    """-e 1: a second client waits until the first has gone; -e 2 serves
    both at once."""
    need_nbd_module()
    import nbd
    nbdinfo = need("nbdinfo", "libnbd-bin")
    for s, uri, d in pair(["-t", "-e", shared, "-f", "raw"], "r.raw"):
        first = nbd.NBD()
        first.connect_uri(uri)
        second = spawn([nbdinfo, "--size", uri],
                                  stdout=subprocess.PIPE, text=True)
        try:
            second.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        assert (second.poll() is None) == waits, s.prog
        first.shutdown()
        out, _ = second.communicate(timeout=10)
        assert (second.returncode, out) == (0, f"{SIZE}\n")


def test_fork_and_pid_file(tmp_path, template):
    """--fork returns 0 once the socket listens; the PID file names the
    server, which exits after its client and leaves the file behind."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    for prog in programs():
        d = workdir(tmp_path, template, prog)
        p = subprocess.run([prog, "-f", "qcow2", "--fork", "--pid-file",
                            str(d / "pid"), "-k", str(d / "s"),
                            str(d / "top.qcow2")], capture_output=True,
                           text=True, timeout=20)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
        assert (d / "s").exists()
        pid = int((d / "pid").read_text())
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert os.path.basename(f.read().split(b"\0")[0]) in (
                    b"qemu-nbd", b"strata-nbd")
            run(nbdinfo, "--size", f"nbd+unix:///?socket={d}/s")
            wait_until(lambda: not (d / "s").exists(), 10, 0.05,
                       what=f"{prog} to exit and remove its socket")
            assert not (d / "s").exists()
            assert (d / "pid").exists()
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tcp(tmp_path, template):
    """-b/-p: both serve on the port given (-t: the probe for the port
    counts as a client)."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    sizes = []
    for prog in programs():
        d = workdir(tmp_path, template, prog)
        port = free_port()
        s = Server(prog, ["-t", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
                          str(d / "r.raw")], port=port)
        try:
            sizes.append(run(nbdinfo, "--size",
                             f"nbd://127.0.0.1:{port}").stdout)
        finally:
            s.stop()
    assert sizes[0] == sizes[1] == f"{SIZE}\n"


# ---- known differences in src/nbd/server.c (not strata-nbd's) -----------

def test_server_can_df(pair):
    (_, quri, _), (_, suri, _) = pair(["-t", "-f", "qcow2"])
    nbdinfo = need("nbdinfo", "libnbd-bin")
    q = json.loads(run(nbdinfo, "--json", quri).stdout)["exports"][0]
    s = json.loads(run(nbdinfo, "--json", suri).stdout)["exports"][0]
    assert s["can_df"] == q["can_df"] is True


def test_server_read_only_multi_conn(pair):
    """-r -e 1: no multi-conn (a second connection would wait)."""
    (_, quri, _), (_, suri, _) = pair(["-t", "-f", "qcow2", "-r"])
    assert nbdinfo_json(suri) == nbdinfo_json(quri)
    assert not nbdinfo_json(suri)["exports"][0]["can_multi_conn"]


def test_server_request_errnos(pair):
    """Where proto.md leaves the choice, strata keeps its own answers:
    zero-length requests fail with EINVAL (qemu-nbd lets them succeed;
    proto.md: unspecified, no disconnect) and writes past the end with
    ENOSPC (proto.md's SHOULD; qemu-nbd: EINVAL).  Too-long requests are
    EINVAL in both (proto.md's SHOULD)."""
    need_nbd_module()
    (_, quri, _), (_, suri, _) = pair(["-t", "-f", "raw"], "r.raw")
    same = [lambda h: h.pread(32 * MiB + 1, 0),
            lambda h: h.cache(32 * MiB + 1, 0)]
    assert nbd_errno(suri, *same) == nbd_errno(quri, *same) == ["EINVAL"] * 2
    ours = [lambda h: h.pread(0, 0), lambda h: h.pwrite(b"", 0),
            lambda h: h.zero(0, 0), lambda h: h.trim(0, 0),
            lambda h: h.pwrite(b"x" * 512, SIZE),
            lambda h: h.zero(512, SIZE)]
    assert nbd_errno(suri, *ours) == ["EINVAL"] * 4 + ["ENOSPC"] * 2


# ---- the NBD client (src/drivers/nbd.c) against QEMU's ------------------

def test_client_errors(tmp_path, template):
    """strata-img info and qemu-img info on an NBD URI nobody serves, and
    on an export the server does not have: the same words."""
    qemu_img = need("qemu-img", "qemu-utils")
    strata_img = binary("strata-img")
    port = free_port()
    uris = [f"nbd+unix:///disk?socket={tmp_path}/none.sock",
            f"nbd://127.0.0.1:{port}/disk"]
    d = workdir(tmp_path, template, QEMU_NBD)
    s = Server(QEMU_NBD, ["-t", "-f", "raw", "-x", "disk", "-k",
                          str(d / "s"), str(d / "r.raw")], sock=str(d / "s"))
    try:
        for uri in uris + [f"nbd+unix:///nope?socket={d}/s"]:
            q = run(qemu_img, "info", uri, check=False)
            ours = run(strata_img, "info", uri, check=False)
            assert q.returncode == ours.returncode == 1
            # qemu adds the server's own words on a second line
            want = q.stderr.splitlines()[0].replace("qemu-img", "PROG")
            assert ours.stderr.replace("strata-img", "PROG") == want + "\n"
    finally:
        s.stop()
