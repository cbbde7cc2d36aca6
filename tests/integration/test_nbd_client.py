"""The nbd protocol driver (src/drivers/nbd.c) against real NBD servers.

qemu-nbd and nbdkit serve images on unix sockets in a short private
directory (socket paths are limited to 108 bytes) or on 127.0.0.1 with a
port found by binding port 0; every server is stopped by its PID.  qemu-io
and qemu-img are the oracles for data and for block status.
"""
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import binary, free_port, io_cmds, need, run, spawn
from harness import procs


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="strata-nbd-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Server(procs.Server):
    """A server process started in the foreground, stopped by its PID;
    start() again after stop() brings it back."""

    def stop(self, sig=15):
        """Stop the server; SIG 9 is a crash (nbdkit's graceful shutdown
        waits for its clients)."""
        if self.proc:
            super().stop(sig)
        self.proc = None


@pytest.fixture
def servers():
    started = []

    def start(argv, sock=None, port=None):
        srv = Server(argv, sock=sock, port=port)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def qemu_nbd(servers, sock, image, fmt, name):
    return servers([need("qemu-nbd", "qemu-utils"), "-k", sock, "-f", fmt,
                    "-x", name, "--persistent", image], sock=sock)


def nbdkit(servers, sock, *plugin):
    return servers([need("nbdkit", "nbdkit"), "-f", "-U", sock, *plugin],
                   sock=sock)


def unix_uri(sock, name=""):
    return f"nbd+unix:///{name}?socket={sock}"


def sio(*args, check=True, timeout=30):
    return run(binary("strata-io"), *args, check=check, timeout=timeout)


def assert_io_ok(proc):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for bad in ("failed", "error", "Pattern verification"):
        assert bad not in out, out


def test_qemu_nbd_read_write(sockdir, servers, qemu_io, qemu_img, tmp_path):
    img = tmp_path / "disk.qcow2"
    run(qemu_img, "create", "-f", "qcow2", img, "8M")
    run(qemu_io, "-f", "qcow2", *io_cmds("write -P 0x5a 0 64k",
                                          "write -P 0xa5 3M 128k"), img)
    sock = sockdir / "q.sock"
    srv = qemu_nbd(servers, sock, img, "qcow2", "name")
    uri = unix_uri(sock, "name")

    p = sio("-f", "raw", *io_cmds("read -P 0x5a 0 64k",
                                  "read -P 0xa5 3M 128k",
                                  "read -P 0 64k 64k",
                                  "write -P 0xc3 5M 192k",
                                  "write -P 0x3c 1M 4k",
                                  "length"), uri)
    assert_io_ok(p)
    assert "8 MiB" in p.stdout
    srv.stop()
    p = run(qemu_io, "-f", "qcow2", *io_cmds("read -P 0xc3 5M 192k",
                                             "read -P 0x3c 1M 4k",
                                             "read -P 0x5a 0 64k"), img)
    assert "Pattern verification failed" not in p.stdout + p.stderr


def test_map_matches_qemu_img(sockdir, servers, qemu_io, qemu_img, tmp_path):
    img = tmp_path / "disk.qcow2"
    run(qemu_img, "create", "-f", "qcow2", img, "16M")
    run(qemu_io, "-f", "qcow2", *io_cmds("write -P 1 0 1M",
                                          "write -z 2M 1M",
                                          "write -P 2 7M 64k",
                                          "write -P 3 15M 1M"), img)
    sock = sockdir / "q.sock"
    qemu_nbd(servers, sock, img, "qcow2", "m")
    uri = unix_uri(sock, "m")

    ours = json.loads(run(binary("strata-img"), "map", "--output=json",
                          "-f", "raw", uri).stdout)
    theirs = json.loads(run(qemu_img, "map", "--output=json", "-f", "raw",
                            uri).stdout)
    key = lambda es: [(e["start"], e["length"], e["data"], e["zero"])
                      for e in es]
    assert key(ours) == key(theirs)
    assert any(e["data"] for e in ours) and any(e["zero"] for e in ours)
    # Probed over NBD (no -f): the top image is probed, raw here.
    probed = json.loads(run(binary("strata-img"), "map", "--output=json",
                            uri).stdout)
    assert key(probed) == key(ours)


@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_nbdkit_round_trips(sockdir, servers, tmp_path, plugin):
    sock = sockdir / "k.sock"
    if plugin == "memory":
        nbdkit(servers, sock, "memory", "64M")
    else:
        f = tmp_path / "backing.raw"
        with open(f, "wb") as fh:
            fh.truncate(64 << 20)
        nbdkit(servers, sock, "file", f)
    uri = unix_uri(sock)
    p = sio("-f", "raw", *io_cmds("write -P 0x77 0 2M",
                                  "write -f -P 0x78 10M 4k",
                                  "write -z 1M 64k",
                                  "write -z -u 32M 1M",
                                  "discard 1536k 64k",
                                  "flush"), uri)
    assert_io_ok(p)
    p = sio("-r", "-f", "raw", *io_cmds("read -P 0x77 0 1M",
                                        "read -P 0 1M 64k",
                                        "read -P 0x77 1088k 448k",
                                        "read -P 0x78 10M 4k",
                                        "read -P 0 32M 1M"), uri)
    assert_io_ok(p)
    if plugin == "file":
        data = (tmp_path / "backing.raw").read_bytes()
        assert data[:1 << 20] == b"\x77" * (1 << 20)
        assert data[(1 << 20):(1 << 20) + 65536] == bytes(65536)
        assert data[10 << 20:(10 << 20) + 4096] == b"\x78" * 4096


def test_inet_and_blockdev_options(servers, tmp_path):
    port = free_port()
    servers([need("nbdkit", "nbdkit"), "-f", "-i", "127.0.0.1", "-p",
             str(port), "memory", "8M"], port=port)
    uri = f"nbd://127.0.0.1:{port}/"
    p = sio("-f", "raw", *io_cmds("write -P 0x42 0 64k",
                                  "read -P 0x42 0 64k"), uri)
    assert_io_ok(p)
    # A URI and blockdev-style server options on one node conflict.
    p = sio("-f", "raw", "-o",
            f"file.server.type=inet,file.server.host=127.0.0.1,"
            f"file.server.port={port}", *io_cmds("read 0 64k"), uri,
            check=False)
    assert p.returncode != 0
    assert "cannot be combined" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_qcow2_overlay_on_nbd_backing(sockdir, servers, qemu_io, qemu_img,
                                      tmp_path):
    base = tmp_path / "base.raw"
    run(qemu_img, "create", "-f", "raw", base, "16M")
    run(qemu_io, "-f", "raw", *io_cmds("write -P 0x11 0 1M",
                                        "write -P 0x22 9M 256k"), base)
    base_before = base.read_bytes()
    sock = sockdir / "b.sock"
    srv = qemu_nbd(servers, sock, base, "raw", "base")
    uri = unix_uri(sock, "base")

    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(binary("strata-img"), "create", "-f", "qcow2", "-b", uri, "-F", "raw",
        ours, "16M")
    run(qemu_img, "create", "-f", "qcow2", "-b", uri, "-F", "raw", theirs)
    info = json.loads(run(qemu_img, "info", "--output=json", "-U",
                          ours).stdout)
    assert info["backing-filename"] == uri

    for img in (ours, theirs):
        p = sio(*io_cmds("read -P 0x11 0 1M", "read -P 0x22 9M 256k",
                         "write -P 0x99 4M 64k"), img)
        assert_io_ok(p)
    # The overlays' writes went to the overlays only (qemu-nbd serves one
    # client at a time, so the comparisons run one by one).
    srv.stop()
    assert base.read_bytes() == base_before
    local = tmp_path / "local.qcow2"
    run(qemu_img, "create", "-f", "qcow2", "-b", base, "-F", "raw", local)
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0x99 4M 64k", local)
    srv.start()
    for img in (ours, theirs):
        run(qemu_img, "compare", "-U", local, img)


class Interactive:
    """strata-io reading commands from stdin, one prompt at a time."""

    def __init__(self, *args):
        self.proc = spawn([binary("strata-io"), *map(str, args)],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.prompt()

    def prompt(self, timeout=20):
        buf = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"strata-io> "):
            left = deadline - time.monotonic()
            assert left > 0, f"no prompt within {timeout} s: {buf!r}"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                assert chunk, f"strata-io exited: {buf!r}"
                buf += chunk
        return buf.decode()

    def cmd(self, line, timeout=20):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.prompt(timeout)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=20)
        err = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err


def test_reconnect_within_delay(sockdir, servers, tmp_path):
    f = tmp_path / "disk.raw"
    f.write_bytes(b"\x5e" * (1 << 20))
    sock = sockdir / "r.sock"
    srv = nbdkit(servers, sock, "file", f)
    io = Interactive("-f", "raw", "-o", "file.reconnect-delay=5",
                     unix_uri(sock))
    try:
        assert "read 4096/4096" in io.cmd("read -P 0x5e 0 4k")
        srv.stop(9)
        # The request waits while the server is away ...
        io.proc.stdin.write(b"read -P 0x5e 8k 4k\n")
        io.proc.stdin.flush()
        time.sleep(1)
        srv.start()
        # ... and succeeds once it is back.
        out = io.prompt()
        assert "read 4096/4096" in out, out
        assert "read 4096/4096" in io.cmd("read -P 0x5e 0 4k")
        out = io.cmd("write -P 0x61 64k 4k")
        assert "wrote 4096/4096" in out, out
    finally:
        err = io.close()
    assert "error" not in err.lower(), err
    assert f.read_bytes()[64 << 10:(64 << 10) + 4096] == b"\x61" * 4096


def assert_one_error(out, err, uri, msg):
    """The failed command printed one line naming URI and MSG."""
    lines = [l for l in (out + err).splitlines()
             if l.strip() and l.strip() != "strata-io>"]
    assert len(lines) == 1, out + err
    assert "read failed" in lines[0] and uri in lines[0] and msg in lines[0]


def test_reconnect_gives_up(sockdir, servers, tmp_path):
    f = tmp_path / "disk.raw"
    f.write_bytes(bytes(1 << 20))
    sock = sockdir / "r.sock"
    uri = unix_uri(sock)
    named = f"nbd+unix://?socket={sock}"     # as QEMU names it
    srv = nbdkit(servers, sock, "file", f)

    # Delay 0: a request after the server died fails at once, one line.
    io = Interactive("-r", "-f", "raw", uri)
    assert "read 4096/4096" in io.cmd("read 0 4k")
    srv.stop(9)
    t0 = time.monotonic()
    out = io.cmd("read 0 4k", timeout=10)
    assert time.monotonic() - t0 < 3
    assert_one_error(out, io.close(), named,
                     "connection to the NBD server lost")

    # Delay 1: requests wait about a second, then fail naming the URI.
    srv.start()
    io = Interactive("-r", "-f", "raw", "-o", "file.reconnect-delay=1", uri)
    assert "read 4096/4096" in io.cmd("read 0 4k")
    srv.stop(9)
    t0 = time.monotonic()
    out = io.cmd("read 0 4k", timeout=10)
    took = time.monotonic() - t0
    assert 0.8 < took < 5, took
    assert_one_error(out, io.close(), named, "reconnect failed within 1 s")


@pytest.mark.parametrize("uri,msg", [
    ("nbd+unix:///e?socket=", "missing socket path"),
    ("nbd+unix:///e", "missing ?socket=PATH"),
    ("nbd+unix://host/e?socket=/x", "takes no host"),
    ("nbd+unix:///e?socket=/x&foo=1", "unknown query parameter"),
    ("nbd://:10809/e", "missing host name"),
    ("nbd:///e", "missing host name"),
    ("nbd://h:0/e", "bad port '0'"),
    ("nbd://h:70000/e", "bad port '70000'"),
    ("nbd://h:12ab/e", "bad port '12ab'"),
    ("nbd://h/e?socket=/x", "unknown query parameter"),
    ("nbds://h/e", "TLS"),
    ("nbd+unix:///e?socket=/nonexistent/strata.sock", "Failed to connect"),
])
def test_bad_uris(uri, msg):
    for fmt in (["-f", "raw"], []):
        p = sio(*fmt, "-c", "read 0 512", uri, check=False, timeout=20)
        assert p.returncode != 0
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and msg in lines[0] and uri in lines[0], \
            p.stderr


def test_parallel_requests(sockdir, servers, tmp_path):
    """Eight threads writing through one nbd node (strata-img bench) land
    every byte."""
    f = tmp_path / "disk.raw"
    with open(f, "wb") as fh:
        fh.truncate(8 << 20)
    sock = sockdir / "p.sock"
    nbdkit(servers, sock, "file", f)
    run(binary("strata-img"), "bench", "-w", "-c", "2048", "-d", "8",
        "--pattern=0x5c", "-f", "raw", unix_uri(sock), timeout=60)
    assert f.read_bytes() == b"\x5c" * (8 << 20)


def test_probed_qcow2_over_nbd(sockdir, servers, qemu_io, qemu_img, tmp_path):
    """With no -f the format is probed over the nbd node: a qcow2 file
    served as raw bytes opens as qcow2 on top of nbd.  (An NBD export
    cannot grow, so only writes into allocated clusters fit.)"""
    img = tmp_path / "disk.qcow2"
    run(qemu_img, "create", "-f", "qcow2", img, "4M")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0x6b 1M 64k", img)
    sock = sockdir / "q.sock"
    srv = qemu_nbd(servers, sock, img, "raw", "q")
    p = sio(*io_cmds("read -P 0x6b 1M 64k", "write -P 0x6c 1M 4k",
                     "info"), unix_uri(sock, "q"))
    assert_io_ok(p)
    assert "format name: qcow2" in p.stdout, p.stdout
    srv.stop()
    run(qemu_img, "check", img)
    p = run(qemu_io, "-f", "qcow2", *io_cmds("read -P 0x6c 1M 4k",
                                             "read -P 0x6b 1028k 60k"), img)
    assert "Pattern verification failed" not in p.stdout


def test_multi_conn_pool(sockdir, servers, tmp_path):
    """A server that advertises multi-conn gets more than one connection
    when requests overlap (nbdkit's log filter counts them), and the data
    written through all of them lands."""
    f = tmp_path / "disk.raw"
    with open(f, "wb") as fh:
        fh.truncate(8 << 20)
    log = tmp_path / "nbdkit.log"
    sock = sockdir / "mc.sock"
    nbdkit(servers, sock, "--filter=log", "file", f, f"logfile={log}")
    run(binary("strata-img"), "bench", "-w", "-c", "4096", "-d", "8",
        "--pattern=0x6d", "-f", "raw", unix_uri(sock), timeout=60)
    assert f.read_bytes() == b"\x6d" * (8 << 20)
    connects = [l for l in log.read_text().splitlines() if " Connect " in l]
    assert len(connects) > 1, connects


def test_pool_with_a_single_client_server(sockdir, servers, qemu_img,
                                          tmp_path):
    """qemu-nbd -r advertises multi-conn but takes one client (-e 1): the
    extra connection never gets its handshake, and requests go on over the
    one they have."""
    img = tmp_path / "d.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(img), "8M")
    run(need("qemu-io", "qemu-utils"), "-c", "write -P 0x2a 0 8M", str(img))
    sock = sockdir / "one.sock"
    servers([need("qemu-nbd", "qemu-utils"), "-r", "-k", sock, "-f", "qcow2",
             "--persistent", img], sock=sock)
    p = run(binary("strata-img"), "bench", "-c", "4096", "-d", "8",
            "-f", "raw", unix_uri(sock), timeout=60)
    assert "Run completed" in p.stdout
    p = sio("-f", "raw", "-r", "-c", "read -P 0x2a 0 8M", unix_uri(sock))
    assert_io_ok(p)


def test_uri_forms_and_filenames_as_qemu_img(sockdir, servers, qemu_img,
                                             qemu_io, tmp_path):
    """Every way QEMU names an NBD export opens the same export, and
    `info` shows the name QEMU shows for it: the URIs (no "/" when the
    export name is empty) and the older nbd:unix:PATH / nbd:HOST:PORT
    syntax with :exportname=, also as a qcow2 backing file name."""
    img = tmp_path / "d.raw"
    run(qemu_img, "create", "-q", "-f", "raw", img, "4M")
    run(qemu_io, "-f", "raw", "-c", "write -P 9 0 64k", img)
    sock = sockdir / "s"
    port = free_port()
    servers([need("qemu-nbd", "qemu-utils"), "-k", sock, "-f", "raw", "-r",
             "-e", "8", "-t", img], sock=sock)
    servers([need("qemu-nbd", "qemu-utils"), "-b", "127.0.0.1", "-p",
             str(port), "-f", "raw", "-r", "-e", "8", "-x", "ex", "-t", img],
            port=port)
    names = [f"nbd+unix:///?socket={sock}", f"nbd+unix://?socket={sock}",
             f"nbd:unix:{sock}", f"nbd://127.0.0.1:{port}/ex",
             f"nbd+tcp://127.0.0.1:{port}/ex",
             f"nbd:127.0.0.1:{port}:exportname=ex"]
    for name in names:
        want = json.loads(run(qemu_img, "info", "-U", "--output=json",
                              name).stdout)
        got = json.loads(run(binary("strata-img"), "info", "-U",
                             "--output=json", name).stdout)
        assert got == want, name        # no actual-size, no dirty-flag
        assert want["virtual-size"] == 4 << 20
        assert_io_ok(sio("-f", "raw", "-r", "-c", "read -P 9 0 64k", name))
    top = tmp_path / "top.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b",
        f"nbd:unix:{sock}", "-F", "raw", top, "4M")
    assert_io_ok(sio("-f", "qcow2", "-r", "-c", "read -P 9 0 64k",
                     "-c", "read -P 0 64k 64k", top))
    human = [run(tool, "info", "-U", "--backing-chain", top).stdout
             for tool in (qemu_img, binary("strata-img"))]
    assert human[0] == human[1]
    assert "disk size: unavailable" in human[1]
    for bad, why in (("nbd:", "missing the server"),
                     ("nbd:localhost", "expected nbd:HOST:PORT"),
                     ("nbd:127.0.0.1:x", "bad port 'x'"),
                     ("nbd:unix:", "missing socket path"),
                     ("nbd:[::1]", "expected nbd:HOST:PORT"),
                     ("nbd:host:70000", "bad port '70000'")):
        p = run(binary("strata-img"), "info", bad, check=False)
        assert p.returncode == 1 and why in p.stderr, p.stderr


def test_without_libnbd(tmp_path, qemu_img):
    """libnbd is loaded at the first nbd open, not at start: with a broken
    libnbd.so.0 first on the library path, local images work as before and
    an nbd open fails with one line naming libnbd and why it did not load."""
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "libnbd.so.0").write_text("not a shared library\n")
    env = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
    img = tmp_path / "t.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", img, "1M")
    assert_io_ok(run(binary("strata-io"), "-c", "write -P 7 0 4k",
                     "-c", "read -P 7 0 4k", img, env=env))
    sock = tmp_path / "none.sock"
    for argv in ([binary("strata-img"), "info", unix_uri(sock)],
                 [binary("strata-io"), "-f", "raw", "-c", "read 0 512",
                  unix_uri(sock)]):
        p = run(*argv, check=False, env=env)
        lines = (p.stdout + p.stderr).strip().splitlines()
        assert p.returncode == 1, p.stdout + p.stderr
        assert len(lines) == 1 and "the nbd driver needs libnbd" in lines[0] \
            and str(libdir / "libnbd.so.0") in lines[0], lines
