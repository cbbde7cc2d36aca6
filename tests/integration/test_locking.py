"""Image locking between strata and QEMU.

strata takes QEMU's OFD locks (bytes 100+perm held, 200+perm not shared),
so each refuses to write an image the other holds.  A long-lived holder
(strata-io or qemu-io reading commands from a pipe this test keeps open,
or qemu-storage-daemon exporting the image) owns the image while the
other tool tries to open it; every holder is stopped by its PID at the
end of the test.
"""
import os
import re
import select
import subprocess
import time

import pytest

from harness import (file_state, io_cmds, make_image, need, run, spawn,
                    wait_until)

TIMEOUT = 20


class Holder:
    """An interactive qemu-io or strata-io on IMG, driven through a pipe."""

    def __init__(self, started, tool, img, *opts):
        self.proc = spawn(
            [tool, "-f", "raw", *opts, str(img)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(self.proc)
        self.pid = self.proc.pid
        self.out = b""
        # The answer to "length" proves the image is open (and locked).
        reply = self.command("length")
        assert re.search(r"(bytes|KiB|MiB)$", reply), reply

    def command(self, cmd):
        """Send CMD and return the next complete output line."""
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + TIMEOUT
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.out:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"holder {self.pid}: no reply to {cmd}")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.proc.stderr.read().decode()
                raise AssertionError(f"holder {self.pid} exited: {err}")
            self.out += chunk
        line, self.out = self.out.split(b"\n", 1)
        # Strip the prompt ("strata-io> " / "qemu-io> ") echoed before it.
        return re.sub(r"^((strata|qemu)-io> )+", "", line.decode())

    def quit(self):
        """End the holder as a user would; returns its exit status."""
        self.proc.stdin.close()
        return self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def holders():
    """A list of the Popen objects of every holder a test starts; each is
    killed by its PID (if still running) and reaped at teardown."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait(timeout=TIMEOUT)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                f.close()


@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "locked.raw", data=b"\x5a" * (1024 * 1024))


def locks_on(path):
    """The /proc/locks lines for the file at PATH."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return [l for l in f if re.search(rf":{ino} ", l)]


def test_strata_writer_blocks_qemu_writer(img, strata_io, qemu_io, qemu_img,
                                          holders):
    holder = Holder(holders, strata_io, img)
    before = file_state(img)
    assert locks_on(img), "strata-io holds the image but took no locks"

    q = run(qemu_io, "-f", "raw", "-c", "write -P 0x11 0 1", img,
            check=False)
    assert q.returncode == 1
    assert 'Failed to get "write" lock' in q.stderr, q.stderr
    assert file_state(img) == before

    # strata shares consistent reads, as a QEMU guest does: a read-only
    # qemu-io still reads, and qemu-img info on raw (which asks for no I/O
    # permission at all) works even without -U.
    q = run(qemu_io, "-f", "raw", "-r", "-c", "read -P 0x5a 0 4096", img)
    assert "Pattern verification failed" not in q.stdout
    info = run(qemu_img, "info", "-f", "raw", img)
    assert "file format: raw" in info.stdout
    info = run(qemu_img, "info", "-U", "-f", "raw", img)
    assert "virtual size: 1 MiB (1048576 bytes)" in info.stdout

    # The holder can still write, and qemu-io -U sees it.
    assert holder.command("write -P 0x22 512 512") == \
        "wrote 512/512 bytes at offset 512"
    run(qemu_io, "-f", "raw", "-U", "-r", "-c", "read -P 0x22 512 512", img)

    # Once the holder exits its locks are gone and qemu-io may write.
    assert holder.quit() == 0
    assert locks_on(img) == []
    run(qemu_io, "-f", "raw", "-c", "write -P 0x11 0 1", img)
    assert img.read_bytes()[0] == 0x11


def lock_error_re(img, pid, comm, perm="write"):
    return re.compile(
        rf"^strata-io: can't open device {re.escape(str(img))}: Failed to "
        rf"get (shared )?\"{perm}\" lock: '{re.escape(str(img))}' is in use "
        rf"by process {pid} \({re.escape(comm)}\)$")


def test_qemu_writer_blocks_strata_writer(img, strata_io, qemu_io, holders):
    holder = Holder(holders, qemu_io, img)
    before = file_state(img)

    s = run(strata_io, "-f", "raw", "-c", "write -P 0x11 0 1", img,
            check=False)
    assert s.returncode == 1
    assert s.stdout == ""
    assert lock_error_re(img, holder.pid, "qemu-io").match(s.stderr.strip()), \
        s.stderr
    assert file_state(img) == before

    # -U -r takes no locks and reads what the holder writes.
    assert holder.command("write -P 0x66 4096 512") == \
        "wrote 512/512 bytes at offset 4096"
    s = run(strata_io, "-f", "raw", "-U", "-r",
            *io_cmds("read -P 0x5a 0 4096", "read -P 0x66 4096 512"), img)
    assert "Pattern verification failed" not in s.stdout
    assert "read 512/512 bytes at offset 4096" in s.stdout

    # -U alone asks to write without locks: refused before opening.
    s = run(strata_io, "-f", "raw", "-U", "-c", "write 0 1", img,
            check=False)
    assert s.returncode == 1 and "read-only" in s.stderr


def test_qemu_storage_daemon_blocks_strata_writer(tmp_path, img, strata_io,
                                                  holders):
    qsd = need("qemu-storage-daemon", "qemu-system-common")
    sock = tmp_path / "nbd.sock"
    proc = spawn(
        [qsd, "--blockdev", f"driver=file,filename={img},node-name=f",
         "--blockdev", "driver=raw,file=f,node-name=r",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=r,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    holders.append(proc)

    def ready():
        if sock.exists() and locks_on(img):
            return True
        assert proc.poll() is None, proc.stderr.read().decode()
        return False
    wait_until(ready, TIMEOUT, 0.05, what="qemu-storage-daemon to listen "
               "and lock the image")
    before = file_state(img)

    s = run(strata_io, "-f", "raw", "-c", "write 0 1", img, check=False)
    assert s.returncode == 1
    # The export does not share resize: strata, which may resize, is out.
    assert lock_error_re(img, proc.pid, "qemu-storage-da", "resize").match(
        s.stderr.strip()), s.stderr
    assert file_state(img) == before
    s = run(strata_io, "-f", "raw", "-U", "-r", "-c", "read -P 0x5a 0 1M",
            img)
    assert "Pattern verification failed" not in s.stdout


def test_second_strata_writer_refused(img, strata_io, holders):
    first = Holder(holders, strata_io, img)
    before = file_state(img)

    s = run(strata_io, "-f", "raw", "-c", "write -P 0x11 0 1", img,
            check=False)
    assert s.returncode == 1
    assert lock_error_re(img, first.pid, "strata-io").match(s.stderr.strip()), \
        s.stderr
    assert "shared" not in s.stderr  # the first does not share "write"
    assert file_state(img) == before

    # A second interactive writer dies at open, too.
    second = subprocess.run([strata_io, "-f", "raw", img], input="length\n",
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 1 and "lock" in second.stderr
    assert "1 MiB" not in second.stdout

    # Without locks a reader coexists with the writer.
    shared = Holder(holders, strata_io, img, "-U", "-r")
    assert shared.command("read -P 0x5a 0 4096") == \
        "read 4096/4096 bytes at offset 0"
    assert first.quit() == 0
    # With the writer gone a new writer gets in.
    run(strata_io, "-f", "raw", "-c", "write -P 0x11 0 1", img)
    assert img.read_bytes()[0] == 0x11
