"""strata-nbd against libnbd's, QEMU's and fio's NBD clients.

Servers listen on unix sockets in tmp_path and are stopped by PID.  The
image is a 3-deep qcow2 chain built with qemu-img/qemu-io; what clients
read through strata-nbd must equal the image, what they write must be in
the image afterwards, and the protocol's error cases must fail with the
errno proto.md names.
"""
import errno
import json
import os
import struct
import subprocess
import threading
import time

import pytest

from harness import (alive, binary, connect_unix, free_port, need, run, spawn,
                    wait_for_path, wait_until)
from harness.procs import tcp_accepts
from harness.daemons import StrataNbd, expect_errno, nbd_handle

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def chain(tmp_path, qemu_img, qemu_io):
    """base <- mid <- top, with data at every depth, a zero cluster in mid
    and unallocated space."""
    base, mid, top = (tmp_path / n for n in ("base.qcow2", "mid.qcow2",
                                              "top.qcow2"))
    run(qemu_img, "create", "-q", "-f", "qcow2", base, str(SIZE))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 1M", base)
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name, "-F",
        "qcow2", mid)
    run(qemu_io, "-f", "qcow2", "-c", "write -P 2 2M 1M",
        "-c", "write -z 4M 64k", mid)
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", mid.name, "-F",
        "qcow2", top)
    run(qemu_io, "-f", "qcow2", "-c", "write -P 3 512k 1M", top)
    return top


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


def serve(servers, *args, **kw):
    s = StrataNbd(*args, **kw)
    servers.append(s)
    return s


def runs(ranges):
    """Merge adjacent (start, length, value) into (start, end, value)."""
    out = []
    for start, length, value in sorted(ranges):
        if out and out[-1][1] == start and out[-1][2] == value:
            out[-1] = (out[-1][0], start + length, value)
        else:
            out.append((start, start + length, value))
    return out


def test_list_and_info(tmp_path, chain, servers):
    nbdinfo = need("nbdinfo", "libnbd-bin")
    s = serve(servers, tmp_path, chain, "-t", "-A", "-x", "disk",
              "-D", "a 3-deep chain", "-e", "2")
    out = run(nbdinfo, "--list", "--json", s.uri).stdout
    info = json.loads(out)
    (exp,) = info["exports"]
    assert exp["export-name"] == "disk"
    assert exp["description"] == "a 3-deep chain"
    assert exp["export-size"] == SIZE
    assert set(exp["contexts"]) == {"base:allocation",
                                    "qemu:allocation-depth"}
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB
    assert exp["is_read_only"] is False
    assert exp["can_multi_conn"] is True      # -e 2, one shared node
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero",
                 "can_fast_zero", "can_cache"):
        assert exp[flag] is True, flag


def test_map_matches_strata_img(tmp_path, chain, servers):
    nbdinfo = need("nbdinfo", "libnbd-bin")
    ours = json.loads(run(binary("strata-img"), "map", "--output=json",
                          chain).stdout)
    s = serve(servers, tmp_path, chain, "-t", "-A", "-r", "-e", "2")
    depth = json.loads(run(nbdinfo, "--map=qemu:allocation-depth", "--json",
                           s.uri).stdout)
    base = json.loads(run(nbdinfo, "--map", "--json", s.uri).stdout)

    want_depth = runs((e["start"], e["length"],
                       e["depth"] + 1 if e["present"] else 0) for e in ours)
    got_depth = runs((e["offset"], e["length"], e["type"]) for e in depth)
    assert got_depth == want_depth
    # The chain really is 3 deep through the server.
    assert {v for _, _, v in got_depth} == {0, 1, 2, 3}

    want_base = runs((e["start"], e["length"],
                      (0 if e["data"] else 1) | (2 if e["zero"] else 0))
                     for e in ours)
    got_base = runs((e["offset"], e["length"], e["type"]) for e in base)
    assert got_base == want_base


def test_nbdcopy_and_convert_equal_image(tmp_path, chain, servers, qemu_img):
    nbdcopy = need("nbdcopy", "libnbd-bin")
    s = serve(servers, tmp_path, chain, "-r", "-e", "2", "-t")
    run(nbdcopy, s.uri, tmp_path / "copy.raw")
    run(qemu_img, "convert", "-O", "raw", s.uri, tmp_path / "conv.raw")
    s.stop()
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2",
        tmp_path / "copy.raw", chain)
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2",
        tmp_path / "conv.raw", chain)


def test_qemu_io_writes_land_in_image(tmp_path, chain, servers, qemu_io,
                                      strata_io):
    s = serve(servers, tmp_path, chain, "--discard=unmap")
    out = run(qemu_io, "-f", "raw", "-c", "write -P 0xab 4k 64k",
              "-c", "write -f -P 0xcd 3M 8k", "-c", "write -z 600k 4k",
              "-c", "flush", "-c", "read -P 0xab 4k 64k", s.uri).stdout
    assert "failed" not in out
    s.wait()   # no -t: exits when the client leaves
    out = run(strata_io, "-f", "qcow2", "-r", "-c", "read -P 0xab 4k 64k",
              "-c", "read -P 0xcd 3M 8k", "-c", "read -P 0 600k 4k",
              "-c", "read -P 3 604k 4k", "-c", "read -P 1 0 4k",
              chain).stdout
    assert "failed" not in out and out.count("read ") == 5


def test_fio_randrw_verify(tmp_path, chain, servers):
    fio = need("fio", "fio")
    s = serve(servers, tmp_path, chain, "-t")
    out = run(fio, "--name=v", "--ioengine=nbd", f"--uri={s.uri}",
              "--rw=randrw", "--bs=4k", "--size=4M", "--iodepth=16",
              "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
              "--output-format=json", timeout=120, cwd=tmp_path).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_shared_clients(tmp_path, chain, servers, qemu_io):
    s = serve(servers, tmp_path, chain, "-e", "4", "-r", "-t")
    procs = [spawn([qemu_io, "-f", "raw", "-r",
                               "-c", "read -P 3 512k 1M",
                               "-c", "read -P 2 2M 1M", s.uri],
                              stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0 and "failed" not in out, out


def test_read_only_refuses_writes(tmp_path, chain, servers, qemu_io):
    s = serve(servers, tmp_path, chain, "-r", "-t")
    # QEMU sees NBD_FLAG_READ_ONLY and refuses to open it for writing,
    # as it does with qemu-nbd -r; the server's EPERM for a write that is
    # sent anyway is checked in test_protocol_errors.
    proc = run(qemu_io, "-f", "raw", "-c", "write -P 9 0 4k", s.uri,
               check=False)
    assert proc.returncode != 0
    assert "Could not open image: Permission denied" in proc.stderr, proc
    out = run(qemu_io, "-f", "raw", "-r", "-c", "read -P 1 0 4k",
              s.uri).stdout
    assert "failed" not in out


def test_protocol_errors(tmp_path, chain, servers):
    s = serve(servers, tmp_path, chain, "-t", "-e", "2")
    nbd, h = nbd_handle(s.uri)
    expect_errno(nbd, lambda: h.pread(512, SIZE), errno.EINVAL)
    expect_errno(nbd, lambda: h.pread(4096, SIZE - 512), errno.EINVAL)
    expect_errno(nbd, lambda: h.pread(0, 0), errno.EINVAL)
    expect_errno(nbd, lambda: h.pread(33 * MiB, 0), errno.EINVAL)
    expect_errno(nbd, lambda: h.cache(33 * MiB, 0), errno.EINVAL)
    expect_errno(nbd, lambda: h.pwrite(b"x" * 512, SIZE - 256),
                 errno.ENOSPC)
    # DF: one data chunk for a range of data and holes.
    assert h.can_df()
    want = (b"\1" * 512 * KiB + b"\3" * MiB + bytes(512 * KiB)
            + b"\2" * MiB + bytes(MiB))
    for flags in (0, nbd.CMD_FLAG_DF):
        chunks = []
        buf = h.pread_structured(
            4 * MiB, 0, lambda sub, off, status, err:
            chunks.append((status, off, len(sub))), flags)
        assert buf == want
        if flags:
            assert chunks == [(nbd.READ_DATA, 0, 4 * MiB)]
        else:
            assert (nbd.READ_HOLE, 3 * MiB, MiB) in chunks, chunks
    expect_errno(nbd, lambda: h.pread(512, 0, 1 << 7), errno.EINVAL)
    expect_errno(nbd, lambda: h.zero(4096, 512 * 1024,
                                     nbd.CMD_FLAG_FAST_ZERO),
                 errno.ENOTSUP)           # would have to write
    h.zero(4096, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)   # already zero: fast
    # The connection survived all of it.
    assert h.pread(4096, 512 * 1024) == b"\3" * 4096
    h.shutdown()

    # Without structured replies no DF, and a too-long read is EINVAL.
    nbd, h = nbd_handle(s.uri, structured=False)
    assert not h.can_df()
    expect_errno(nbd, lambda: h.pread(512, 0, nbd.CMD_FLAG_DF),
                 errno.EINVAL)
    expect_errno(nbd, lambda: h.pread(33 * MiB, 0), errno.EINVAL)
    assert h.pread(4096, 2 * MiB) == b"\2" * 4096
    h.shutdown()
    s.stop()

    s2 = serve(servers, tmp_path, chain, "-t", "-r", fmt="qcow2")
    nbd, h = nbd_handle(s2.uri)
    expect_errno(nbd, lambda: h.pwrite(b"x" * 512, 0), errno.EPERM)
    expect_errno(nbd, lambda: h.trim(4096, 0), errno.EPERM)
    h.shutdown()


# ---- raw-socket clients for what libnbd will not send


def recvn(sk, n):
    b = b""
    while len(b) < n:
        chunk = sk.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b


def raw_connect(sock):
    # The socket file appears at bind(), a moment before listen().
    sk = connect_unix(sock, timeout=5)
    greeting = recvn(sk, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    sk.sendall(struct.pack(">I", 3))   # FIXED_NEWSTYLE | NO_ZEROES
    return sk


def send_opt(sk, opt, data=b""):
    sk.sendall(b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data)


def recv_opt_reply(sk):
    magic, opt, typ, length = struct.unpack(">QIII", recvn(sk, 20))
    assert magic == 0x3e889045565a9
    return opt, typ, recvn(sk, length)


def raw_go(sk):
    send_opt(sk, 7, struct.pack(">IH", 0, 0))
    while True:
        _, typ, _ = recv_opt_reply(sk)
        if typ == 1:
            return


def test_option_edge_cases(tmp_path, chain, servers):
    s = serve(servers, tmp_path, chain, "-t", "-A")
    sk = raw_connect(s.sock)
    # SET_META_CONTEXT before STRUCTURED_REPLY: NBD_REP_ERR_INVALID.
    query = b"base:allocation"
    send_opt(sk, 10, struct.pack(">I", 0) + struct.pack(">I", 1)
             + struct.pack(">I", len(query)) + query)
    assert recv_opt_reply(sk)[1] == 0x80000003
    # Unknown option: NBD_REP_ERR_UNSUP.  Too long: NBD_REP_ERR_TOO_BIG.
    send_opt(sk, 200, b"abc")
    assert recv_opt_reply(sk)[1] == 0x80000001
    send_opt(sk, 6, b"\0" * 100000)
    assert recv_opt_reply(sk)[1] == 0x80000009
    # Unknown export: NBD_REP_ERR_UNKNOWN; malformed GO: ERR_INVALID.
    send_opt(sk, 7, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert recv_opt_reply(sk)[1] == 0x80000006
    send_opt(sk, 7, struct.pack(">I", 400) + b"short")
    assert recv_opt_reply(sk)[1] == 0x80000003
    raw_go(sk)
    # Unknown command: EINVAL in a simple reply.  BLOCK_STATUS with no
    # context selected: EINVAL.
    sk.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 42, 7, 0, 512))
    assert struct.unpack(">IIQ", recvn(sk, 16)) == (0x67446698, 22, 7)
    sk.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 3, 8, 0, 0))  # flush
    assert struct.unpack(">IIQ", recvn(sk, 16)) == (0x67446698, 0, 8)
    sk.close()


def test_bad_clients_do_not_hurt_others(tmp_path, chain, servers, qemu_io):
    s = serve(servers, tmp_path, chain, "-t", "-e", "4")
    # 1. A write header with half its payload, then gone.
    sk = raw_connect(s.sock)
    raw_go(sk)
    sk.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, MiB)
               + b"\xee" * 1000)
    sk.close()
    # 2. A client that sends many big reads and never reads a reply.
    hog = raw_connect(s.sock)
    raw_go(hog)
    hog.setblocking(False)
    sent = 0
    req = struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 8 * MiB)
    try:
        for _ in range(1000):
            sent += hog.send(req)
    except BlockingIOError:
        pass
    assert sent > 0
    # Others are served meanwhile, and the half write changed nothing.
    t0 = time.monotonic()
    out = run(qemu_io, "-f", "raw", "-c", "read -P 1 0 4k",
              "-c", "write -P 7 8M 64k", "-c", "read -P 7 8M 64k",
              s.uri, timeout=30).stdout
    assert "failed" not in out and out.count("bytes at offset") == 3
    assert time.monotonic() - t0 < 20
    hog.close()
    out = run(qemu_io, "-f", "raw", "-c", "read -P 1 0 4k", s.uri).stdout
    assert "failed" not in out


def test_tcp(tmp_path, chain, qemu_io):
    nbdinfo = need("nbdinfo", "libnbd-bin")
    port = free_port()
    proc = spawn([binary("strata-nbd"), "-f", "qcow2", "-r",
                             "-t", "-b", "127.0.0.1", "-p", str(port),
                             "-x", "tcp", str(chain)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: tcp_accepts(port), 10, 0.05,
                   what=f"strata-nbd to listen on port {port}")
        uri = f"nbd://127.0.0.1:{port}/tcp"
        assert json.loads(run(nbdinfo, "--json", uri).stdout)[
            "exports"][0]["export-size"] == SIZE
        out = run(qemu_io, "-f", "raw", "-r", "-c", "read -P 2 2M 4k",
                  uri).stdout
        assert "failed" not in out
    finally:
        os.kill(proc.pid, 15)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_fork_and_pid_file(tmp_path, chain, qemu_io):
    sock = tmp_path / "f.sock"
    pidf = tmp_path / "pid"
    run(binary("strata-nbd"), "-f", "qcow2", "-k", sock, "--fork",
        "--pid-file", pidf, "-r", chain, timeout=20)
    assert sock.exists()          # listening once the parent returned
    pid = int(pidf.read_text())
    try:
        out = run(qemu_io, "-f", "raw", "-r", "-c", "read -P 3 512k 4k",
                  f"nbd+unix:///?socket={sock}").stdout
        assert "failed" not in out
        # no -t: it exits after that client
        wait_until(lambda: not alive(pid), 10, 0.05,
                   what=f"strata-nbd {pid} to exit")
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, 9)


@pytest.mark.parametrize("mode,discard,zero,data", [
    ("off", "ignore", False, True),
    ("on", "ignore", True, False),
    ("unmap", "unmap", True, False),
])
def test_detect_zeroes(tmp_path, mode, discard, zero, data):
    """An all-zero WRITE becomes a zero cluster with --detect-zeroes, as
    with qemu-nbd; qemu-img map tells which."""
    img = tmp_path / "z.qcow2"
    run(need("qemu-img", "qemu-utils"), "create", "-q", "-f", "qcow2",
        str(img), "4M")
    sock = str(tmp_path / "z.sock")
    # --discard first: qemu-nbd checks detect-zeroes=unmap against the
    # discard mode given before it.
    p = spawn([binary("strata-nbd"), "-f", "qcow2", "-k", sock,
                          f"--discard={discard}", f"--detect-zeroes={mode}",
                          str(img)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_path(sock, p, "strata-nbd", timeout=5, interval=0.025)
        run(need("qemu-io", "qemu-utils"), "-f", "raw", "-c",
            "write -P 0 0 1M", f"nbd+unix:///?socket={sock}")
    finally:
        assert p.wait(timeout=30) == 0, p.stderr.read()
        p.stderr.close()
    m = json.loads(run(need("qemu-img", "qemu-utils"), "map",
                       "--output=json", str(img)).stdout)
    assert m[0]["start"] == 0 and m[0]["length"] >= 1 << 20
    assert m[0]["zero"] is zero and m[0]["data"] is data


def test_detect_zeroes_refusals(tmp_path):
    img = tmp_path / "z.qcow2"
    run(need("qemu-img", "qemu-utils"), "create", "-q", "-f", "qcow2",
        str(img), "1M")
    for args, qemu_args in [(["--detect-zeroes=bogus"], ["--detect-zeroes=bogus"]),
                            (["--detect-zeroes=unmap"], ["--detect-zeroes=unmap"])]:
        ours = subprocess.run([binary("strata-nbd"), *args, str(img)],
                              capture_output=True, text=True, timeout=30)
        theirs = subprocess.run([need("qemu-nbd", "qemu-utils"), *qemu_args,
                                 str(img)], capture_output=True, text=True,
                                timeout=30)
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]


def max_overlap(log):
    """The most requests nbdkit's log filter shows in flight at once."""
    now = most = 0
    for line in log.splitlines():
        if " Read id=" in line:
            now += 1
            most = max(most, now)
        elif " ...Read id=" in line:
            now -= 1
    return most


def test_slow_backing_reads_run_in_parallel(tmp_path, servers, qemu_img,
                                           qemu_io):
    """Reads that block (here on a backing file behind nbdkit's delay
    filter) each get a worker, even right after a run of short requests
    that one worker served alone: four reads of the base are in flight
    together at the base's server."""
    nbdkit = need("nbdkit", "nbdkit")
    bsock, log = tmp_path / "b.sock", tmp_path / "log.txt"
    base = spawn([nbdkit, "-f", "-U", bsock, "--filter=log",
                             "--filter=delay", "memory", str(SIZE),
                             "rdelay=300ms", f"logfile={log}"],
                            stderr=subprocess.PIPE)
    try:
        wait_for_path(bsock, base, "nbdkit")
        top = tmp_path / "top.qcow2"
        run(qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b",
            f"nbd+unix:///?socket={bsock}", "-F", "raw", top, str(SIZE))
        run(qemu_io, "-f", "qcow2", "-c", "write -P 7 8M 1M", top)
        s = serve(servers, tmp_path, top, "-r")
        nbd, h = nbd_handle(s.uri)
        for i in range(400):            # short: top-layer data
            h.aio_pread(nbd.Buffer(4096), 8 * MiB + (i % 256) * 4096)
            if h.aio_in_flight() >= 8:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        before = log.read_text().count(" Read id=")
        bufs = [nbd.Buffer(65536) for _ in range(4)]
        for i, b in enumerate(bufs):    # slow: each goes to the base
            h.aio_pread(b, i * MiB)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(b.to_bytearray() == bytes(65536) for b in bufs)
        h.shutdown()
        s.stop()
    finally:
        base.terminate()
        base.wait(10)
    text = log.read_text()
    assert before == 0, "the short reads went to the base"
    assert text.count(" Read id=") == 4
    assert max_overlap(text) == 4, text
