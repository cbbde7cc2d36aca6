"""A small QMP client for the tests: connect, greeting, negotiation,
commands with ids, events.  Every read has a timeout so nothing hangs.

QMP speaks to one monitor socket (stratad's or qemu-storage-daemon's);
harness.daemons builds the daemon wrappers on top of it.
"""
import json
import socket
import time

from .wait import wait_until


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=5.0, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        wait_until(lambda: self._connect(path), timeout,
                   what=f"a QMP monitor to accept on {path}")
        self.timeout = timeout
        self.buf = b""
        self.events = []
        self.next_id = 0
        self.greeting = self.recv()
        if negotiate:
            self.execute("qmp_capabilities")

    def _connect(self, path):
        try:
            self.sock.connect(str(path))
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            return False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def send(self, obj):
        self.send_raw(json.dumps(obj))

    def recv_line(self, timeout=None):
        """One raw line (with its "\\r\\n"), or b"" at EOF."""
        self.sock.settimeout(timeout or self.timeout)
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                line, self.buf = self.buf, b""
                return line
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def recv(self, timeout=None):
        """The next message, or None at EOF."""
        line = self.recv_line(timeout)
        if not line:
            return None
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def reply(self, timeout=None):
        """The next reply, keeping events aside.

        qemu-storage-daemon 7.2 has been seen (once, in CI) to send its
        greeting a second time on a connection made just after the
        previous client left; that repeat is dropped.
        A repeated greeting from stratad is a bug and is returned as is."""
        while True:
            msg = self.recv(timeout)
            if msg is not None and "QMP" in msg and self._qemu_greeting():
                continue
            if msg is None or "event" not in msg:
                return msg
            self.events.append(msg)

    def _qemu_greeting(self):
        pkg = ((self.greeting or {}).get("QMP", {}).get("version", {})
               .get("package", ""))
        return not pkg.startswith("strata")

    def cmd(self, name, args=None, **kw):
        """The full reply to NAME (with an id)."""
        self.next_id += 1
        msg = {"execute": name, "id": self.next_id}
        if args is not None:
            msg["arguments"] = args
        self.send(msg)
        rsp = self.reply(**kw)
        assert rsp is not None and rsp.get("id") == self.next_id, rsp
        return rsp

    def execute(self, name, args=None):
        rsp = self.cmd(name, args)
        if "error" in rsp:
            raise QMPError(rsp["error"]["desc"])
        return rsp["return"]

    def event(self, name, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event")
            msg = self.recv(left)
            if msg is None:
                raise EOFError(f"connection closed before {name}")
            if "event" in msg:
                self.events.append(msg)
