"""Helpers shared by the qcow2 integration tests.

A Model is the guest's view of an image as a bytearray; applying the same
operations to the model and to an image (through qemu-io or strata-io)
lets a test check every byte with 'read -P' over the model's runs of equal
bytes, so a mistake shared by strata and QEMU would still show.

Also here: qemu-img create/check, qemu-io and strata-io runs, and reading
or patching the qcow2 header (big-endian fields) of a file on disk.
qemu_img() and qemu_io() are functions (the paths of QEMU's tools); the
fixtures of the same names in conftest.py return the same paths.
"""
import os
import struct

from .env import binary, need, run

KiB = 1024
MiB = 1024 * KiB


def qemu_img():
    return need("qemu-img", "qemu-utils")


def qemu_io():
    return need("qemu-io", "qemu-utils")


def create(path, size, backing=None, backing_fmt="qcow2", **opts):
    """qemu-img create -f qcow2 PATH SIZE with -o OPTS (and -b/-F)."""
    args = [qemu_img(), "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}"
                                 for k, v in opts.items())]
    if backing:
        args += ["-b", str(backing), "-F", backing_fmt]
    run(*args, str(path), str(size), cwd=os.path.dirname(str(path)))


def cmds(ops):
    out = []
    for c in ops:
        out += ["-c", c]
    return out


def qio(path, ops, fmt="qcow2", check=True):
    return run(qemu_io(), "-f", fmt, *cmds(ops), str(path), check=check)


def sio(path, ops, fmt="qcow2", check=True, extra=(), timeout=120):
    return run(binary("strata-io"), *(["-f", fmt] if fmt else []), *extra,
               *cmds(ops), str(path), check=check, timeout=timeout)


class Model:
    """Guest contents; ops use qemu-io's command syntax."""

    def __init__(self, size, base=None):
        self.size = size
        self.data = bytearray(size)
        if base is not None:
            n = min(size, len(base.data))
            self.data[:n] = base.data[:n]

    def write(self, off, length, byte):
        self.data[off:off + length] = bytes([byte]) * length
        return f"write -q -P 0x{byte:02x} {off} {length}"

    def zero(self, off, length, unmap=False):
        self.data[off:off + length] = bytes(length)
        return f"write -q -z {'-u ' if unmap else ''}{off} {length}"

    def runs(self):
        d, i, step = bytes(self.data), 0, 4096
        while i < len(d):
            b = d[i]
            same = bytes([b]) * step
            j = i + 1
            while j + step <= len(d) and d[j:j + step] == same:
                j += step
            while j < len(d) and d[j] == b:
                j += 1
            yield i, j - i, b
            i = j

    def read_cmds(self):
        return [f"read -q -P 0x{b:02x} {o} {n}" for o, n, b in self.runs()]


def check_reads(tool_run, path, model, fmt="qcow2"):
    """Every byte of MODEL reads back from PATH through TOOL_RUN."""
    ops = model.read_cmds()
    for i in range(0, len(ops), 200):
        p = tool_run(path, ops[i:i + 200], fmt=fmt, check=False)
        assert p.returncode == 0 and "verification failed" not in p.stdout, (
            f"{path}: reads differ from the model\n{p.stdout}\n{p.stderr}")


def qemu_check(path):
    """qemu-img check: no corruption and no leaks."""
    p = run(qemu_img(), "check", str(path), check=False)
    assert p.returncode == 0 and "No errors were found" in p.stdout, (
        f"qemu-img check {path} exited {p.returncode}\n{p.stdout}{p.stderr}")


def header(path):
    """The fields of the qcow2 header as a dict (big-endian on disk)."""
    with open(path, "rb") as f:
        h = f.read(104)
    names = ("magic version backing_file_offset backing_file_size "
             "cluster_bits size crypt_method l1_size l1_table_offset "
             "refcount_table_offset refcount_table_clusters nb_snapshots "
             "snapshots_offset").split()
    vals = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
    d = dict(zip(names, vals))
    if d["version"] >= 3:
        (d["incompatible_features"], d["compatible_features"],
         d["autoclear_features"], d["refcount_order"],
         d["header_length"]) = struct.unpack(">QQQII", h[72:104])
    return d


def patch(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))
