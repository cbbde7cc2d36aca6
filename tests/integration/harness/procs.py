"""Processes a test starts: started through spawn(), stopped by PID.

Every process spawn() starts is remembered until it is stopped; the
autouse fixture in conftest.py calls reap() after each test, which kills
(SIGKILL, then wait) whatever a test left running, so a failing test
leaves no orphan server holding an image lock or a socket.  Nothing is
ever stopped by name.

stop() is the polite end (a signal, a bounded wait, then SIGKILL);
wait_for_path() and connect_unix() are the two waits every server start
needs (the socket file appears, the socket accepts).  Server is a
listening daemon started in the foreground on a unix socket (or a TCP
port): strata-nbd, qemu-nbd, nbdkit.
"""
import os
import signal
import socket
import subprocess

from .wait import wait_until

_running = []


def spawn(argv, **kw):
    """subprocess.Popen(ARGV, **KW), remembered for reap()."""
    proc = subprocess.Popen([str(a) for a in argv], **kw)
    _running.append(proc)
    return proc


def track(proc):
    """Remember PROC (a Popen started elsewhere) for reap(); returns it."""
    _running.append(proc)
    return proc


def _close_pipes(proc):
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f and not f.closed:
            f.close()


def kill(proc):
    """SIGKILL PROC (if it still runs) and wait for it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    _close_pipes(proc)


def stop(proc, sig=signal.SIGTERM, timeout=10):
    """Send SIG to PROC and wait up to TIMEOUT seconds, then SIGKILL it;
    read what is left of its pipes.  Returns the exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.communicate()
    return proc.returncode


def reap():
    """Kill every spawned process that still runs; returns their argv."""
    left = []
    while _running:
        proc = _running.pop()
        if proc.poll() is None:
            left.append(proc.args)
            kill(proc)
    return left


def alive(pid):
    """True while PID runs (a zombie waiting for init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stderr(proc):
    err = proc.stderr.read() if proc.stderr else ""
    return err.decode(errors="replace") if isinstance(err, bytes) else err


def wait_for_path(path, proc=None, what=None, timeout=10, interval=0.02):
    """Wait until PATH exists; fail at once, with PROC's stderr, if PROC
    exits first."""
    what = what or (proc.args[0] if proc else "a process")

    def ready():
        if os.path.exists(path):
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited: {_stderr(proc)}")
        return False
    wait_until(ready, timeout, interval, what=f"{what} to create {path}")


def connect_unix(path, timeout=10, sock_timeout=10):
    """A socket connected to the unix socket PATH; a refused connection
    (the file exists from bind(), a moment before listen()) is retried."""
    def attempt():
        sk = socket.socket(socket.AF_UNIX)
        sk.settimeout(sock_timeout)
        try:
            sk.connect(str(path))
            return sk
        except (ConnectionRefusedError, FileNotFoundError):
            sk.close()
            return None
    return wait_until(attempt, timeout, 0.025,
                      what=f"a server to accept on {path}")


def tcp_accepts(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), 0.2).close()
        return True
    except OSError:
        return False


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


class Server:
    """ARGV serving on the unix socket SOCK (or the TCP PORT), started in
    the foreground and stopped by its PID.  start() may be called again
    after stop() (a server that comes back)."""

    def __init__(self, argv, sock=None, port=None, stdout=subprocess.DEVNULL,
                 timeout=10):
        self.argv = [str(a) for a in argv]
        self.prog = self.argv[0]
        self.sock, self.port = (str(sock) if sock else None), port
        self.stdout, self.timeout = stdout, timeout
        self.proc = None
        self.start()

    def ready(self):
        if self.sock:
            return os.path.exists(self.sock)
        return tcp_accepts(self.port)

    def start(self):
        if self.sock and os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = spawn(self.argv, stdout=self.stdout,
                          stderr=subprocess.PIPE, text=True)

        def up():
            if self.ready():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.prog} did not start: "
                                     f"{self.proc.stderr.read()}")
            return False
        try:
            wait_until(up, self.timeout, what=f"{self.prog} to listen on "
                       f"{self.sock or self.port}")
        except AssertionError:
            self.stop()
            raise

    def wait(self, timeout=10):
        """Wait for a server to exit by itself: (exit status, stderr)."""
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """SIG (SIGKILL is a crash), then SIGKILL after TIMEOUT seconds:
        (exit status, stderr, whether it had to be killed)."""
        killed = False
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                _, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                _, err = self.proc.communicate()
        else:
            _, err = self.proc.communicate()
        return self.proc.returncode, err or "", killed
