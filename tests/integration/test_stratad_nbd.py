"""stratad's NBD server and exports against qemu-storage-daemon.

The same QMP scenario (nbd-server-start/stop, block-export-add/del,
query-block-exports, blockdev-del of an exported node) runs against
qemu-storage-daemon (the oracle) and stratad; replies, error texts and the
BLOCK_EXPORT_DELETED events must be the same.  Then peers use stratad's
exports: nbdinfo lists them, qemu-io writes through one and the image file
holds the data afterwards, a connected client blocks a safe removal and is
cut off by a hard one.  The command-line forms (--nbd-server, --export)
are compared with qemu-storage-daemon's too.
"""
import json
import os
import re
import subprocess

import pytest

from harness import binary, need, run, spawn, wait_for_path, wait_until
from harness.daemons import Monitor


def qemu_img():
    return need("qemu-img", "qemu-utils")


def qemu_io():
    return need("qemu-io", "qemu-utils")


class EventMonitor(Monitor):
    """A Monitor that keeps the events it reads, in order."""

    def __init__(self, argv0, tmp, name, extra=()):
        self.events = []
        self._extra = list(extra)
        super().__init__(argv0, tmp, name)

    def _event(self, msg):
        self.events.append({"event": msg["event"], "data": msg.get("data")})

    def take_events(self, wait_for=0, timeout=10):
        """The events so far; first wait until there are WAIT_FOR."""

        def enough():
            if len(self.events) >= wait_for:
                return True
            # query-block-exports is harmless and makes the daemon talk.
            self.cmd("query-block-exports")
            return False
        wait_until(enough, timeout, 0.05, what=lambda: f"{wait_for} "
                   f"events; have {self.events}")
        ev, self.events = self.events, []
        return ev


def daemons(tmp):
    return [("qsd", need("qemu-storage-daemon", "qemu-system-common")),
            ("stratad", binary("stratad"))]


def image(tmp, name="a.qcow2", size="64M"):
    path = tmp / name
    run(qemu_img(), "create", "-q", "-f", "qcow2", str(path), size)
    return path


def blockdev(node, path, read_only=False):
    return {"driver": "qcow2", "node-name": node, "read-only": read_only,
            "file": {"driver": "file", "filename": str(path)}}


def scenario(mon, tmp, tag):
    """Run the command sequence; return (reply, events) per step with the
    socket paths masked."""
    sock = str(tmp / f"{tag}-nbd.sock")
    steps = [
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"}),
        ("query-block-exports", {}),
        ("nbd-server-stop", {}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {}}}),
        ("nbd-server-start", {"addr": {"type": "unix"}}),
        ("nbd-server-start", {"addr": {"type": "inet",
                                       "data": {"host": "127.0.0.1"}}}),
        ("nbd-server-start", {"addr": {"type": "bogus", "data": {}}}),
        ("nbd-server-start", {"addr": {"type": "unix",
                                       "data": {"path": sock}},
                              "max-connections": -1}),
        ("nbd-server-start", {"addr": {"type": "unix",
                                       "data": {"path": sock}},
                              "max-connections": "a"}),
        ("nbd-server-start", {"addr": {"type": "unix",
                                       "data": {"path": sock}}}),
        ("nbd-server-start", {"addr": {"type": "unix",
                                       "data": {"path": sock + "2"}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0",
                              "writable": "x"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0",
                              "bitmaps": "x"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "nx"}),
        ("block-export-add", {"type": "nbd", "id": "#e", "node-name": "n0"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "ro",
                              "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n0"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n0",
                              "name": "other", "writable": True,
                              "description": "the other one"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n0",
                              "name": "x", "bogus": 1}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "ro",
                              "name": "depth", "allocation-depth": True}),
        ("query-block-exports", {}),
        ("blockdev-del", {"node-name": "n0"}),
        ("block-export-del", {"id": "nope"}),
        ("block-export-del", {"id": "e1", "mode": "soft"}),
        ("block-export-del", {"id": "e1", "mode": "hard"}),
        ("query-block-exports", {}),
        ("block-export-del", {"id": "e1"}),
        ("nbd-server-stop", {}),
        ("query-block-exports", {}),
        ("nbd-server-stop", {}),
        ("blockdev-del", {"node-name": "n0"}),
    ]
    out = []
    for name, args in steps:
        reply = mon.cmd(name, **args)
        reply.pop("id", None)
        events = mon.take_events()
        text = json.dumps([reply, events], sort_keys=True).replace(sock, "SOCK")
        out.append((name, json.loads(text)))
    return out


def test_qmp_scenario_matches_qsd(tmp_path):
    results = {}
    for tag, argv0 in daemons(tmp_path):
        base = image(tmp_path, f"{tag}.qcow2")
        mon = EventMonitor(argv0, tmp_path, tag)
        try:
            mon.ok("blockdev-add", **blockdev("n0", base))
            mon.ok("blockdev-add", **{**blockdev("ro", base, True),
                                      "file": {"driver": "file",
                                               "filename": str(base),
                                               "locking": "off"}})
            mon.take_events()
            results[tag] = scenario(mon, tmp_path, tag)
            # Events arrive by the time of the next command; collect any
            # straggler deletion events.
            tail = mon.take_events()
            results[tag].append(("tail", tail))
        finally:
            mon.stop()
    for (name, q), (_, s) in zip(results["qsd"], results["stratad"]):
        assert s == q, f"{name}: stratad {s} != qsd {q}"
    assert len(results["qsd"]) == len(results["stratad"])
    # The deletions were reported, oldest export first at server stop.
    deleted = [e["data"]["id"] for _, (r, evs) in results["stratad"][:-1]
               for e in evs if e["event"] == "BLOCK_EXPORT_DELETED"]
    assert deleted == ["e1", "e0", "e2"]


@pytest.fixture
def served(tmp_path):
    """stratad with n0 (writable, exported as "disk") and the NBD socket."""
    path = image(tmp_path)
    run(qemu_io(), "-c", "write -P 0x11 0 1M", str(path))
    mon = EventMonitor(binary("stratad"), tmp_path, "d")
    sock = str(tmp_path / "nbd.sock")
    mon.ok("blockdev-add", **blockdev("n0", path))
    mon.ok("nbd-server-start",
           addr={"type": "unix", "data": {"path": sock}})
    mon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n0"},
           name="disk", writable=True, description="test disk")
    yield mon, path, sock
    mon.stop()


def uri(sock, name="disk"):
    return f"nbd+unix:///{name}?socket={sock}"


def test_peers_read_and_write_through_export(served):
    mon, path, sock = served
    info = json.loads(run(need("nbdinfo", "libnbd-bin"), "--json",
                          uri(sock)).stdout)
    exp = info["exports"][0]
    assert exp["export-name"] == "disk"
    assert exp["description"] == "test disk"
    assert exp["export-size"] == 64 << 20
    assert exp["is_read_only"] is False
    r = run(qemu_io(), "-f", "raw", "-c", "read -P 0x11 0 1M",
            "-c", "write -P 0x22 2M 512k", uri(sock))
    assert "Pattern verification failed" not in r.stdout
    mon.ok("block-export-del", id="e0")
    mon.ok("nbd-server-stop")
    assert mon.stop() == 0
    # The write reached the image, and the image is clean.
    r = run(qemu_io(), "-c", "read -P 0x22 2M 512k", "-c",
            "read -P 0x11 0 1M", str(path))
    assert "Pattern verification failed" not in r.stdout
    run(qemu_img(), "check", str(path))


def connect(sock, name="disk"):
    code = (
        "import nbd, sys, time\n"
        "h = nbd.NBD()\n"
        f"h.connect_uri({uri(sock, name)!r})\n"
        "print('connected', flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    h.pread(512, 0)\n"
        "    print('read ok', flush=True)\n"
        "except Exception as e:\n"
        "    print('read failed', e, flush=True)\n")
    p = spawn(["/usr/bin/python3", "-c", code],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "connected"
    return p


def finish(p):
    p.stdin.write("\n")
    p.stdin.flush()
    out = p.stdout.readline().strip()
    p.wait(timeout=30)
    return out


def test_safe_and_hard_removal_with_a_client(served):
    pytest.importorskip("nbd")
    mon, path, sock = served
    client = connect(sock)
    try:
        reply = mon.cmd("block-export-del", id="e0")
        assert reply["error"] == {"class": "GenericError",
                                  "desc": "export 'e0' still in use"}
        # Still exported and usable.
        assert [e["id"] for e in mon.ok("query-block-exports")] == ["e0"]
        assert finish(client) == "read ok"
        client = connect(sock)
        mon.ok("block-export-del", id="e0", mode="hard")
        evs = mon.take_events(wait_for=1)
        assert evs == [{"event": "BLOCK_EXPORT_DELETED",
                        "data": {"id": "e0"}}]
        assert mon.ok("query-block-exports") == []
        assert finish(client).startswith("read failed")
        # The node is free again.
        mon.ok("blockdev-del", **{"node-name": "n0"})
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_server_stop_disconnects_and_reports(served):
    pytest.importorskip("nbd")
    mon, path, sock = served
    client = connect(sock)
    try:
        mon.ok("nbd-server-stop")
        evs = mon.take_events(wait_for=1)
        assert evs == [{"event": "BLOCK_EXPORT_DELETED",
                        "data": {"id": "e0"}}]
        assert finish(client).startswith("read failed")
        assert not os.path.exists(sock) or \
            subprocess.run([need("nbdinfo", "libnbd-bin"), uri(sock)],
                           capture_output=True).returncode != 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_tcp_server(tmp_path):
    """An inet address on loopback, read-only export by default."""
    path = image(tmp_path)
    mon = EventMonitor(binary("stratad"), tmp_path, "t")
    try:
        mon.ok("blockdev-add", **blockdev("n0", path, True))
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mon.ok("nbd-server-start", addr={"type": "inet", "data": {
            "host": "127.0.0.1", "port": str(port)}})
        mon.ok("block-export-add", type="nbd", id="e0",
               **{"node-name": "n0"})
        info = json.loads(run(need("nbdinfo", "libnbd-bin"), "--json",
                              f"nbd://127.0.0.1:{port}/n0").stdout)
        assert info["exports"][0]["is_read_only"] is True
        mon.ok("nbd-server-stop")
    finally:
        mon.stop()


def cli_errors(argv0, tmp, tag):
    """The first line each bad command line prints, program name cut."""
    path = image(tmp, f"cli-{tag}.qcow2")
    bd = f"driver=qcow2,node-name=n0,file.driver=file,file.filename={path}"
    sock = str(tmp / f"cli-{tag}.sock")
    cases = [
        ["--nbd-server", "addr.type=unix"],
        ["--nbd-server", f"addr.type=unix,addr.path={sock},bogus=1"],
        ["--export", "type=nbd,id=e0,node-name=n0"],
        ["--blockdev", bd, "--export", "type=nbd,id=e0,node-name=n0"],
        ["--blockdev", bd, "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e0,node-name=nx"],
    ]
    out = []
    for extra in cases:
        r = subprocess.run([argv0, "--chardev",
                            f"socket,id=m,path={tmp}/cli-{tag}-m.sock,"
                            "server=on,wait=off", "--monitor", "chardev=m",
                            *extra], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1, (extra, r.stderr)
        line = r.stderr.splitlines()[0]
        line = re.sub(r"^[^:]*: ", "", line).replace(sock, "SOCK")
        out.append(line.replace(str(path), "IMG"))
    return out


def test_command_line_matches_qsd(tmp_path):
    got = {tag: cli_errors(argv0, tmp_path, tag)
           for tag, argv0 in daemons(tmp_path)}
    assert got["stratad"] == got["qsd"]


def test_command_line_serves(tmp_path):
    path = image(tmp_path)
    sock = str(tmp_path / "cli.sock")
    qmp = str(tmp_path / "cli-m.sock")
    p = spawn(
        [binary("stratad"), "--chardev",
         f"socket,id=m,path={qmp},server=on,wait=off", "--monitor",
         "chardev=m", "--blockdev",
         f"driver=qcow2,node-name=n0,file.driver=file,file.filename={path}",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "nbd,id=e0,node-name=n0,name=foo,writable=on,"
         "description=123"], stderr=subprocess.PIPE, text=True)
    try:

        def up():
            if os.path.exists(qmp) and os.path.exists(sock):
                return True
            assert p.poll() is None, p.stderr.read()
            return False
        wait_until(up, 5, 0.025, what="stratad's QMP and NBD sockets")
        info = json.loads(run(need("nbdinfo", "libnbd-bin"), "--json",
                              uri(sock, "foo")).stdout)
        assert info["exports"][0]["description"] == "123"
        run(qemu_io(), "-f", "raw", "-c", "write -P 0x5a 0 64k",
            uri(sock, "foo"))
    finally:
        p.terminate()
        assert p.wait(timeout=30) == 0
        p.stderr.close()
    r = run(qemu_io(), "-c", "read -P 0x5a 0 64k", str(path))
    assert "Pattern verification failed" not in r.stdout


def test_blockdev_add_nbd_matches_qsd(tmp_path):
    """blockdev-add driver=nbd (a remote export as a node): the same
    replies as qemu-storage-daemon for good and bad arguments, the same
    query-named-block-nodes image, and the data reads back through an
    export of a raw node over it."""
    data = tmp_path / "d.raw"
    run(qemu_img(), "create", "-q", "-f", "raw", str(data), "4M")
    run(qemu_io(), "-f", "raw", "-c", "write -P 5 0 64k", str(data))
    src = str(tmp_path / "src.sock")
    server = spawn([need("qemu-nbd", "qemu-utils"),
                               "-f", "raw", "-t", "-e", "8", "-x", "ex",
                               "-k", src, str(data)])
    try:
        wait_for_path(src, server, "qemu-nbd", timeout=5, interval=0.025)
        good = {"type": "unix", "path": src}
        cases = [
            {}, {"server": {"type": "unix"}},
            {"server": {"type": "inet", "host": "127.0.0.1"}},
            {"server": {"type": "inet", "port": "1"}},
            {"server": {"type": "bogus"}}, {"server": {"path": "/x"}},
            {"server": {"type": "unix", "path": str(tmp_path / "none")}},
            {"server": {"type": "inet", "host": "127.0.0.1", "port": 1}},
            {"server": {"type": "unix", "path": "/x", "bogus": 1}},
            {"server": good, "reconnect-delay": -1},
            {"server": good, "export": 5},
            {"server": good, "export": "nope"},
            {"server": good, "export": "ex", "node-name": "n"},
        ]
        results = {}
        for tag, argv0 in daemons(tmp_path):
            mon = Monitor(argv0, tmp_path, tag)
            try:
                out = [mon.cmd("blockdev-add", **{"driver": "nbd",
                                                  "node-name": "a", **c})
                       for c in cases]
                out.append(mon.cmd("blockdev-add", driver="raw",
                                   **{"node-name": "r"}, file="n"))
                out.append(sorted((n["node-name"], n["image"]) for n in
                                  mon.ok("query-named-block-nodes")))
                if tag == "stratad":
                    sock = str(tmp_path / "exp.sock")
                    mon.ok("nbd-server-start", addr={
                        "type": "unix", "data": {"path": sock}})
                    mon.ok("block-export-add", type="nbd", id="e",
                           **{"node-name": "r"})
                    p = run(qemu_io(), "-f", "raw", "-r", "-c",
                            "read -P 5 0 64k", "-c", "read -P 0 64k 64k",
                            f"nbd+unix:///r?socket={sock}")
                    assert "verification failed" not in p.stdout
            finally:
                mon.stop()
            results[tag] = out
        assert results["stratad"] == results["qsd"]
        assert results["qsd"][-1][0][1]["format"] == "nbd"
        # Where stratad refuses what qemu-storage-daemon would try.
        mon = Monitor(binary("stratad"), tmp_path, "refusals")
        try:
            for kind in ("vsock", "fd"):
                r = mon.cmd("blockdev-add", driver="nbd",
                            server={"type": kind}, **{"node-name": "a"})
                assert r["error"]["desc"] == (
                    f"strata does not implement server.type '{kind}' "
                    "(only 'unix' and 'inet')"), r
            r = mon.cmd("blockdev-add", driver="nbd", server=good,
                        **{"node-name": "a", "reconnect-delay": 1 << 32})
            assert r["error"]["desc"] == \
                "Parameter 'reconnect-delay' expects uint32_t", r
            assert mon.ok("query-named-block-nodes") == []
        finally:
            mon.stop()
        assert "dirty-flag" not in results["qsd"][-1][1][1]
    finally:
        server.terminate()
        server.wait(10)
