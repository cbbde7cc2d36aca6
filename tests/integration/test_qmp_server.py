"""stratad's QMP server against qemu-storage-daemon: the same conversations,
replies compared field by field (versions and timestamps masked); then
what only a server under load shows: many clients, a stuck client, a client
gone mid-message, an oversized message, a stress run; and the daemon's
process life: --pidfile, --daemonize, SIGTERM."""
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from harness import binary, need, spawn, wait_until
from harness import QMP
from harness.daemons import start_qmp as start
from harness.procs import stop


@pytest.fixture
def stratad(tmp_path):
    sock = str(tmp_path / "strata.sock")
    proc = start([binary("stratad"), "--qmp", sock], sock)
    yield sock
    stop(proc)


@pytest.fixture
def qsd(tmp_path):
    sock = str(tmp_path / "qsd.sock")
    proc = start([need("qemu-storage-daemon", "qemu-system-common"),
                  "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                  "--monitor", "chardev=m"], sock)
    yield sock
    stop(proc)


def mask(msg):
    """MSG with what legitimately differs replaced by placeholders."""
    if isinstance(msg, dict):
        out = {}
        for k, v in msg.items():
            if k in ("micro", "minor", "major", "seconds", "microseconds"):
                out[k] = "N"
            elif k == "package":
                out[k] = "PKG"
            else:
                out[k] = mask(v)
        return out
    if isinstance(msg, list):
        return [mask(v) for v in msg]
    return msg


def converse(sock, inputs, negotiate=True):
    """Send each input (bytes) on a fresh negotiated connection; collect
    the replies that arrive."""
    out = []
    with QMP(sock, negotiate=negotiate) as q:
        out.append(q.greeting)
        for data in inputs:
            q.send_raw(data)
        # A marker command tells us when everything before it was answered.
        q.send_raw(b'\n{"execute": "query-version", "id": "end"}')
        while True:
            msg = q.recv()
            if msg is None or msg.get("id") == "end":
                break
            out.append(msg)
    return out


SCENARIOS = {
    "unknown command": [b'{"execute": "foo"}'],
    "negotiation twice": [b'{"execute": "qmp_capabilities"}'],
    "malformed": [b'{"a":}', b'{"a" 1}', b'{"execute": x}\n', b'}'],
    "garbage after a command": [b'{"execute": "query-version"} garbage\n'],
    "non-object": [b'[1, 2]', b'"x"'],
    "missing execute": [b'{"id": 5}', b'{"arguments": {}}'],
    "unexpected member": [b'{"execute": "query-version", "foo": 1}',
                          b'{"execute": "query-version", "control": {}}'],
    "execute not a string": [b'{"execute": 5}'],
    "arguments not an object": [
        b'{"execute": "query-version", "arguments": []}'],
    "unexpected argument": [
        b'{"execute": "query-version", "arguments": {"x": 1}}'],
    "wrong argument type": [
        b'{"execute": "query-named-block-nodes", "arguments": '
        b'{"flat": "yes"}, "id": "t"}',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": 1}}'],
    "bad capability": [
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}'],
    "exec-oob without oob": [b'{"exec-oob": "query-version"}'],
    "id echo": [b'{"execute": "query-version", "id": 1.5}'
                b'{"execute": "query-version", "id": null}'
                b'{"execute": "query-version", "id": true}\r\n  '
                b'{"execute": "query-version", "id": {"a": [1, "b"]}}'
                b'{"execute": "foo", "id": [1, {"a": null}]}'
                b'{"execute": "query-version", "id": "\\u00e9"}'],
    "several per line, split values": [
        b'{"execute": "query-', b'version", "id": 1}{"exe',
        b'cute": "query-version", "id": 2}'],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_replies_as_qsd(stratad, qsd, name):
    ours = converse(stratad, SCENARIOS[name])
    theirs = converse(qsd, SCENARIOS[name])
    assert [mask(m) for m in ours] == [mask(m) for m in theirs]


def test_before_negotiation(stratad, qsd):
    inputs = [b'{"execute": "query-version", "id": 1}',
              b'{"execute": "nope"}',
              b'{"execute": "query-version", "foo": 1}',
              b'{"execute": "qmp_capabilities", "arguments": {"enable": 1}}',
              b'{"execute": "qmp_capabilities"}']
    ours = converse(stratad, inputs, negotiate=False)
    theirs = converse(qsd, inputs, negotiate=False)
    assert [mask(m) for m in ours] == [mask(m) for m in theirs]
    assert ours[1]["error"] == {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}


def test_greeting_and_version(stratad):
    with QMP(stratad) as q:
        assert q.greeting == {"QMP": {"version": {
            "qemu": {"micro": 0, "minor": 1, "major": 0},
            "package": "strata-0.1.0"}, "capabilities": ["oob"]}}
        assert q.execute("query-version") == q.greeting["QMP"]["version"]


def test_query_commands(stratad, qsd):
    with QMP(stratad) as q:
        ours = {c["name"] for c in q.execute("query-commands")}
    with QMP(qsd) as q:
        theirs = {c["name"] for c in q.execute("query-commands")}
    assert {"qmp_capabilities", "query-version", "query-commands",
            "quit"} <= ours
    # Every command strata implements is one QEMU has, by the same name
    # (x-blockdev-reopen: QEMU's name before 6.1, kept as an alias;
    # x-block-pull-range: strata's own, docs/jobs.md).
    extensions = {"x-blockdev-reopen", "x-block-pull-range"}
    assert ours - extensions <= theirs, ours - theirs


def test_quit(tmp_path):
    sock = str(tmp_path / "s")
    proc = start([binary("stratad"), "--qmp", sock], sock)
    try:
        with QMP(sock) as q, QMP(sock) as watcher:
            assert q.cmd("quit") == {"return": {}, "id": 2}
            # qemu-system's SHUTDOWN event (qsd sends none): both clients.
            for c in (q, watcher):
                e = c.event("SHUTDOWN")
                assert e["data"] == {"guest": False,
                                     "reason": "host-qmp-quit"}
                assert set(e["timestamp"]) == {"seconds", "microseconds"}
            assert q.recv() is None
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(sock)
    finally:
        stop(proc)


def test_many_clients_while_one_is_stuck(stratad):
    stuck = socket.socket(socket.AF_UNIX)
    stuck.connect(stratad)
    stuck.sendall(b'{"execute": "qmp_capabilities"}{"execute": "quer')
    # It never reads; it queues requests whose replies pile up unread...
    stuck.sendall(b'y-version"}' + b'{"execute": "query-commands"}' * 2000)
    # ...and trickles a huge message that never ends.
    stuck.sendall(b'{"arguments": {"x": "' + b"a" * 100000)
    errors = []

    def worker(n):
        try:
            with QMP(stratad, timeout=5) as q:
                for i in range(50):
                    t = time.monotonic()
                    assert q.cmd("query-version")["return"]
                    assert time.monotonic() - t < 2
        except Exception as e:  # reported below
            errors.append(f"client {n}: {e!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for i in range(20):
        stuck.sendall(b"a" * 1000)
    for t in threads:
        t.join(30)
    stuck.close()
    assert not errors, errors


def test_disconnect_mid_message(stratad):
    with QMP(stratad) as other:
        s = socket.socket(socket.AF_UNIX)
        s.connect(stratad)
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-ver')
        s.close()
        assert other.execute("query-version")
    with QMP(stratad) as q:
        assert q.execute("query-version")


def test_oversized_message(stratad):
    with QMP(stratad) as big, QMP(stratad) as other:
        chunk = b'{"execute": "query-version", "arguments": {"x": "'
        big.send_raw(chunk)
        piece = b"a" * (1 << 20)
        try:
            for _ in range(17):
                big.send_raw(piece)
                assert other.execute("query-version")
        except (BrokenPipeError, ConnectionResetError):
            pass
        rsp = big.recv(timeout=10)
        assert rsp["error"]["class"] == "GenericError"
        assert "16 MiB" in rsp["error"]["desc"]
        try:
            assert big.recv(timeout=10) is None
        except ConnectionResetError:
            pass  # closed with our unread input still queued: also closed
        assert other.execute("query-version")


def test_stress_malformed_and_valid(stratad):
    seed = int(os.environ.get("STRATA_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    valid = [b'{"execute": "query-version"}', b'{"execute": "foo"}',
             b'{"execute": "query-commands", "id": [1]}']
    bad = [b'{"a":}', b'[1]', b'{"id": 1}', b'}', b'\xff\n', b'{"x" 1}',
           b'garbage\n', b'"s"', b'{"execute": 5}']
    errors = []

    def worker(n):
        r = random.Random(seed + n)
        try:
            with QMP(stratad, timeout=10) as q:
                data = b"".join(r.choice(valid + bad) for _ in range(600))
                q.send_raw(data)
                q.send_raw(b'\n{"execute": "query-version", "id": "done"}')
                t = time.monotonic()
                while True:
                    m = q.recv()
                    assert m is not None
                    if m.get("id") == "done":
                        break
                    assert time.monotonic() - t < 20
        except Exception as e:
            errors.append(f"client {n}: {e!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"seed {seed}: {errors}"
    with QMP(stratad) as q:
        assert q.execute("query-version")


def test_daemonize_pidfile_sigterm(tmp_path):
    sock, pidfile = tmp_path / "d.sock", tmp_path / "d.pid"
    proc = subprocess.run([binary("stratad"), "--qmp", str(sock),
                           "--pidfile", str(pidfile), "--daemonize"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    # The parent returned only once the socket listens.
    pid = int(pidfile.read_text())
    try:
        with QMP(sock, timeout=5) as q:
            assert q.execute("query-version")
            os.kill(pid, signal.SIGTERM)
            assert q.event("SHUTDOWN")["data"]["reason"] == "host-signal"
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10,
                   what=f"stratad {pid} to exit")
        assert not os.path.exists(f"/proc/{pid}")
        assert not sock.exists() and not pidfile.exists()
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_exit_status(tmp_path):
    sock = str(tmp_path / "s")
    proc = start([binary("stratad"), "--qmp", sock, "--pidfile",
                  str(tmp_path / "pid")], sock)
    assert int((tmp_path / "pid").read_text()) == proc.pid
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not os.path.exists(sock)
    assert not (tmp_path / "pid").exists()


def test_chardev_monitor_and_live_socket(tmp_path):
    sock = str(tmp_path / "m.sock")
    proc = start([binary("stratad"), "--chardev",
                  f"socket,id=m,path={sock},server=on,wait=off",
                  "--monitor", "chardev=m"], sock)
    try:
        with QMP(sock) as q:
            assert q.execute("query-version")
        second = subprocess.run([binary("stratad"), "--qmp", sock],
                                capture_output=True, text=True, timeout=10)
        assert second.returncode == 1
        assert "already listening" in second.stderr
    finally:
        stop(proc)


def test_stress_with_images(tmp_path):
    """Several clients send a mix of valid and broken block commands at a
    daemon that holds a qcow2 chain; afterwards the daemon still answers,
    and once it stops every image passes qemu-img check with its guest
    content unchanged."""
    qemu_img = need("qemu-img", "qemu-utils")
    qemu_io = need("qemu-io", "qemu-utils")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base),
                    "16M"], check=True)
    subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -P 1 0 4M",
                    str(base)], check=True, capture_output=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b",
                    "base.qcow2", "-F", "qcow2", str(top)], check=True)
    subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -P 2 1M 1M",
                    str(top)], check=True, capture_output=True)
    flat_before = tmp_path / "before.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(top),
                    str(flat_before)], check=True)
    sock = str(tmp_path / "s.sock")
    proc = start([binary("stratad"), "--qmp", sock, "--blockdev",
                  f"driver=qcow2,node-name=top,file.driver=file,"
                  f"file.filename={top}"], sock)
    seed = int(os.environ.get("STRATA_SEED", random.randrange(1 << 30)))
    missing = tmp_path / "missing.qcow2"
    msgs = [
        b'{"execute": "query-named-block-nodes"}',
        b'{"execute": "query-named-block-nodes", "arguments": {"flat": 1}}',
        b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", '
        b'"node-name": "top", "file": {"driver": "file", "filename": "x"}}}',
        b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", '
        b'"node-name": "m", "file": {"driver": "file", "filename": "'
        + str(missing).encode() + b'"}}}',
        b'{"execute": "blockdev-add", "arguments": {"driver": "nope"}}',
        b'{"execute": "blockdev-del", "arguments": {"node-name": "nobody"}}',
        b'{"execute": "blockdev-reopen", "arguments": {"options": [{"driver"'
        b': "qcow2", "node-name": "top", "read-only": true, "file": "'
        b'#block000"}]}}',
        b'{"execute": "blockdev-snapshot-sync", "arguments": '
        b'{"node-name": "top"}}',
        b'{"execute": "blockdev-del"}', b'{"execute": 5}', b'"x"\n',
        b'\n',
    ]
    # (No unterminated fragments: with brace-balanced framing, as in QEMU,
    # an open '{' or '[' swallows everything after it.)
    errors = []

    def worker(n):
        r = random.Random(seed + n)
        try:
            with QMP(sock, timeout=10) as q:
                q.send_raw(b"".join(r.choice(msgs) for _ in range(300)))
                q.send_raw(b'\n{"execute": "query-version", "id": "done"}')
                t = time.monotonic()
                while True:
                    m = q.recv()
                    assert m is not None
                    if m.get("id") == "done":
                        break
                    assert time.monotonic() - t < 30
        except Exception as e:
            errors.append(f"client {n}: {e!r}")

    try:
        threads = [threading.Thread(target=worker, args=(n,))
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not errors, f"seed {seed}: {errors}"
        with QMP(sock) as q:
            names = {n["node-name"] for n in
                     q.execute("query-named-block-nodes")}
            assert "top" in names and "m" not in names
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert not missing.exists()
    for img in (base, top):
        subprocess.run([qemu_img, "check", str(img)], check=True,
                       capture_output=True)
    cmp = subprocess.run([qemu_img, "compare", str(top), str(flat_before)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, f"seed {seed}: {cmp.stdout}"


@pytest.mark.parametrize("server", ["stratad", "strata-nbd"])
def test_socket_appears_only_when_listening(tmp_path, server):
    """Whoever waits for the socket file may connect at once: the file
    appears only after listen() (bind to a temporary name, then rename),
    so no start ever answers ECONNREFUSED."""
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * 65536)
    for i in range(25):
        sock = tmp_path / f"s{i}.sock"
        argv = ([binary("stratad"), "--qmp", str(sock)]
                if server == "stratad" else
                [binary("strata-nbd"), "-t", "-f", "raw", "-k", str(sock),
                 str(img)])
        proc = spawn(argv, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            # Polled without sleeping: connect the moment the file is
            # there, which is when a connection used to be refused.
            wait_until(lambda: sock.exists() or proc.poll() is not None, 10,
                       interval=0, what=f"{server} to create {sock}")
            assert proc.poll() is None, proc.stderr.read()
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))      # refused before the fix, sometimes
            s.close()
            assert not list(tmp_path.glob("*.tmp"))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            proc.stderr.close()
