"""strata-nbd without -t ends as qemu-nbd 7.2 does: when the last client
leaves, if that client completed the handshake.  Clients that give up
while negotiating (a port probe, garbage, a listing ending in
NBD_OPT_ABORT) do not end the server.

Each scenario runs against qemu-nbd and strata-nbd in turn, recording after
each step whether the server is still running; the two records must be
equal, and equal to what qemu-nbd is known to do.  Servers listen on unix
sockets in tmp_path and are stopped by PID.
"""
import os
import socket
import struct
import subprocess

from harness import binary, need, run, spawn, stop, wait_for_path

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
NBD_OPT_ABORT = 2
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REQUEST_MAGIC = 0x25609513
NBD_CMD_DISC = 2


class Server:
    """PROG -f raw -k SOCK [ARGS] IMAGE, not persistent."""

    def __init__(self, prog, tmp_path, image, *args):
        name = os.path.basename(prog)
        self.sock = str(tmp_path / f"{name}.sock")
        self.proc = spawn(
            [prog, "-f", "raw", "-k", self.sock, *args, str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_path(self.sock, self.proc, what=f"{name} to start")
        except AssertionError:
            self.stop()
            raise
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def running(self, settle=0.5):
        """Whether the server is still running SETTLE seconds from now (a
        server that is going to exit after a client left does so at
        once)."""
        try:
            self.proc.wait(timeout=settle)
        except subprocess.TimeoutExpired:
            return True
        return False

    def exited(self, timeout=10):
        """Whether the server exits by itself, with status 0, in time."""
        try:
            return self.proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False

    def stop(self):
        stop(self.proc)


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def connect(server, greeting=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(server.sock)
    if greeting:
        recv_exactly(s, 18)
    return s


def negotiate(server):
    """A client that completes the handshake (NBD_OPT_GO on the default
    export) and is left in transmission."""
    s = connect(server)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(struct.pack(">QIIIH", IHAVEOPT, NBD_OPT_GO, 6, 0, 0))
    while True:
        _, _, rep, length = struct.unpack(">QIII", recv_exactly(s, 20))
        recv_exactly(s, length)
        if rep == NBD_REP_ACK:
            return s
        assert rep == NBD_REP_INFO, f"NBD_OPT_GO failed: reply {rep:#x}"


def disconnect(s):
    s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 1,
                          0, 0))
    s.close()


def image(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(MiB)
    return path


def close_before_greeting(server, nbdinfo):
    connect(server, greeting=False).close()


def close_after_greeting(server, nbdinfo):
    connect(server).close()


def send_garbage(server, nbdinfo):
    s = connect(server)
    s.sendall(b"\xff" * 64)  # client flags with unknown bits, then junk
    s.close()


def opt_abort(server, nbdinfo):
    s = connect(server)
    s.sendall(struct.pack(">I", 1))
    s.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_ABORT, 0))
    s.close()


def nbdinfo_list(server, nbdinfo):
    run(nbdinfo, "--list", server.uri)


def nbdinfo_size(server, nbdinfo):
    assert run(nbdinfo, "--size", server.uri).stdout.strip() == str(MiB)


def play(prog, tmp_path, nbdinfo, args, steps):
    """Start PROG with ARGS, run STEPS in order and record, after each,
    whether the server still runs; stop at the first step after which it
    does not.  The server's exit status is part of the record."""
    server = Server(prog, tmp_path, image(tmp_path), *args)
    seen = []
    try:
        for step in steps:
            step(server, nbdinfo)
            alive = server.running()
            seen.append((step.__name__, alive))
            if not alive:
                seen.append(("exit status", server.proc.returncode))
                break
    finally:
        server.stop()
    return seen


def both(args, steps, tmp_path):
    qemu_nbd = need("qemu-nbd", "qemu-utils")
    nbdinfo = need("nbdinfo", "libnbd-bin")
    records = []
    for prog in (qemu_nbd, binary("strata-nbd")):
        d = tmp_path / os.path.basename(prog)
        d.mkdir()
        records.append(play(prog, d, nbdinfo, args, steps))
    return records


def test_aborted_handshakes_do_not_end_the_server(tmp_path):
    """Five clients give up during the handshake, then one completes it."""
    qemu, strata = both([], [close_before_greeting, close_after_greeting,
                             send_garbage, opt_abort, nbdinfo_list,
                             nbdinfo_size], tmp_path)
    assert qemu == [
        ("close_before_greeting", True),
        ("close_after_greeting", True),
        ("send_garbage", True),
        ("opt_abort", True),
        ("nbdinfo_list", True),
        ("nbdinfo_size", False),
        ("exit status", 0),
    ]
    assert strata == qemu


def test_last_client_ends_the_server_only_if_it_negotiated(tmp_path):
    """With two slots: a negotiated client leaves while another is in the
    handshake, which then gives up; a third client completes one."""
    held = {}

    def negotiated_client_and_one_negotiating(server, nbdinfo):
        held["a"] = negotiate(server)
        held["b"] = connect(server)

    def negotiated_client_leaves(server, nbdinfo):
        disconnect(held.pop("a"))

    def negotiating_client_gives_up(server, nbdinfo):
        held.pop("b").close()

    steps = [negotiated_client_and_one_negotiating, negotiated_client_leaves,
             negotiating_client_gives_up, nbdinfo_size]
    qemu, strata = both(["-e", "2"], steps, tmp_path)
    assert qemu == [
        ("negotiated_client_and_one_negotiating", True),
        ("negotiated_client_leaves", True),
        ("negotiating_client_gives_up", True),
        ("nbdinfo_size", False),
        ("exit status", 0),
    ]
    assert strata == qemu
