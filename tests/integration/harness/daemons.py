"""stratad and qemu-storage-daemon with a QMP monitor, and strata-nbd.

Every daemon listens on sockets in the test's tmp directory and is
started through procs.spawn(), so the autouse reaper in conftest.py kills
it by PID if a test fails before stopping it.

- Daemon: a QMP daemon spoken to through the QMP client (events kept
  aside, events_until for ordered event sequences); start(kind, tmp)
  starts "qsd" or "stratad".  The block-job tests use it.
- Monitor: a QMP daemon spoken to line by line, events dropped (the
  block-graph and blkdebug tests compare replies only); qsd() and
  stratad() start one.  stop() is SIGTERM, as an init system stops it.
- start_qmp(argv, sock) / procs.stop(): a daemon started with its own
  argv (stratad --qmp SOCK), waited for until its socket exists.
- StrataNbd: strata-nbd serving one image on a unix socket; stopping it
  must end it cleanly (exit 0, no sanitizer report).
- nbd_handle / expect_errno: a libnbd handle for raw protocol requests.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from . import procs
from .env import binary, need
from .qmp import QMP
from .wait import wait_until


class Daemon:
    """A QMP daemon (stratad or qemu-storage-daemon) in TMP."""

    def __init__(self, argv0, tmp, name, extra=()):
        self.sock_path = tmp / f"{name}.sock"
        self.proc = procs.spawn(
            [argv0, "--chardev",
             f"socket,id=m,path={self.sock_path},server=on,wait=off",
             "--monitor", "chardev=m", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self.qmp = QMP(self.sock_path, timeout=30)
        except Exception:
            procs.kill(self.proc)
            raise

    def cmd(self, name, **args):
        rsp = self.qmp.cmd(name, args or None)
        rsp.pop("id", None)
        return rsp

    def ok(self, name, **args):
        rsp = self.cmd(name, **args)
        assert "return" in rsp, f"{name} {args}: {rsp}"
        return rsp["return"]

    def event(self, name, timeout=30, **match):
        """The next event NAME whose data has MATCH's fields."""
        deadline = time.monotonic() + timeout
        while True:
            e = self.qmp.event(name, timeout=max(0.01, deadline
                                                  - time.monotonic()))
            if all(e["data"].get(k) == v for k, v in match.items()):
                return e

    def events_until(self, name, timeout=30, **match):
        """Read events in order until NAME (with MATCH's fields) arrives;
        return them all (timestamps dropped), keeping none aside."""
        out = []
        deadline = time.monotonic() + timeout
        pending = self.qmp.events
        self.qmp.events = []
        while True:
            if pending:
                msg = pending.pop(0)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {name} event; got {out}")
                msg = self.qmp.recv(left)
                assert msg is not None, "daemon closed the connection"
                if "event" not in msg:
                    continue
            msg.pop("timestamp", None)
            out.append(msg)
            if msg["event"] == name and all(
                    msg["data"].get(k) == v for k, v in match.items()):
                self.qmp.events = pending
                return out

    def stop(self):
        """quit; returns the exit status."""
        try:
            self.qmp.cmd("quit")
        except Exception:
            self.proc.send_signal(signal.SIGTERM)
        self.qmp.close()
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stderr.close()

    def kill(self):
        self.qmp.close()
        procs.kill(self.proc)


def start(kind, tmp, extra=()):
    """A Daemon of KIND ("qsd" or "stratad") with its socket in TMP."""
    if kind == "qsd":
        return Daemon(need("qemu-storage-daemon", "qemu-system-common"), tmp,
                      "qsd", extra)
    return Daemon(binary("stratad"), tmp, "stratad", extra)


class Monitor:
    """A daemon started with a QMP monitor on a unix socket in TMP."""

    def __init__(self, argv0, tmp, name):
        self.sock_path = str(tmp / f"{name}.sock")
        self.proc = procs.spawn(
            [argv0, "--chardev",
             f"socket,id=m,path={self.sock_path},server=on,wait=off",
             "--monitor", "chardev=m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.wait_for_path(self.sock_path, self.proc, argv0, timeout=5,
                            interval=0.025)
        self.sock = procs.connect_unix(self.sock_path, timeout=5,
                                       sock_timeout=60)
        # Read-only: writing through a text "rw" file drops what it has
        # already read ahead, such as an event that came with a reply.
        self.f = self.sock.makefile("r")
        assert "QMP" in self._read()
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def _read(self):
        """The next reply; events on the way go to _event()."""
        while True:
            line = self.f.readline()
            assert line, "monitor closed the connection"
            msg = json.loads(line)
            if "event" not in msg:
                return msg
            self._event(msg)

    def _event(self, msg):
        """An event read while waiting for a reply: dropped here;
        subclasses that need events keep them."""

    def cmd(self, execute, **args):
        req = {"execute": execute}
        if args:
            req["arguments"] = args
        self.sock.sendall((json.dumps(req) + "\n").encode())
        return self._read()

    def ok(self, execute, **args):
        reply = self.cmd(execute, **args)
        assert "return" in reply, f"{execute} {args}: {reply}"
        return reply["return"]

    def stop(self):
        """SIGTERM, as an init system stops it; returns the exit status."""
        self.sock.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stderr.close()


def qsd(tmp):
    return Monitor(need("qemu-storage-daemon", "qemu-system-common"), tmp,
                   "qsd")


def stratad(tmp):
    return Monitor(binary("stratad"), tmp, "stratad")


def start_qmp(argv, sock, timeout=10):
    """Start ARGV (a daemon that creates the socket SOCK) and wait for the
    socket; stop it with procs.stop()."""
    proc = procs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def up():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"{argv[0]} did not start: {err!r}")
        return os.path.exists(sock)
    try:
        wait_until(up, timeout, 0.01, what=f"{argv[0]} to create {sock}")
    except AssertionError:
        procs.kill(proc)
        raise
    return proc


class StrataNbd(procs.Server):
    """strata-nbd serving IMAGE on a unix socket in TMP_PATH."""

    def __init__(self, tmp_path, image, *args, fmt="qcow2"):
        sock = str(tmp_path / f"nbd{time.monotonic_ns()}.sock")
        super().__init__([binary("strata-nbd"), "-f", fmt, "-k", sock,
                          *args, str(image)], sock=sock,
                         stdout=subprocess.PIPE)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def wait(self, timeout=15):
        """Wait for a non-persistent server to exit by itself."""
        rc, err = super().wait(timeout)
        assert rc == 0, err
        return err

    def stop(self):
        """SIGTERM: the server must disconnect everyone and exit 0 (and
        cleanly under the sanitizers)."""
        if self.proc.poll() is None:
            rc, err, killed = super().stop()
            if killed:
                raise AssertionError("strata-nbd ignored SIGTERM")
            assert rc == 0, err
            assert "Sanitizer" not in err, err


def nbd_handle(uri, structured=True):
    try:
        import nbd
    except ImportError:
        pytest.fail("libnbd's Python module missing: install python3-libnbd")
    h = nbd.NBD()
    h.set_strict_mode(0)           # let bad requests reach the server
    h.set_request_structured_replies(structured)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return nbd, h


def expect_errno(nbd, fn, want):
    with pytest.raises(nbd.Error) as e:
        fn()
    assert e.value.errnum == want, (e.value.string, e.value.errno)
