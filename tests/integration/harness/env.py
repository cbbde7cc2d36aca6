"""Where the binaries are and how tests run them, plus the text helpers
several modules share (qemu-io timing lines, progress output, a pty).

The binaries under test come from the build directory named by
$STRATA_BUILD (default: build/ at the top of the tree).  QEMU's and
libnbd's tools are the oracles; a test that needs a missing peer fails
and says what to install (scripts/deps.sh installs them all) instead of
skipping.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

# tests/integration, where the C sources of test programs live.
HERE = Path(__file__).resolve().parents[1]
TOP = HERE.parents[1]
BUILD = Path(os.environ.get("STRATA_BUILD", TOP / "build")).resolve()


def need(tool, package):
    """Path of TOOL, or fail naming the Debian package that provides it."""
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} not found: install {package} (scripts/deps.sh)")
    return path


def binary(name):
    path = BUILD / name
    if not path.exists():
        pytest.fail(f"{path} not built: run 'make' first")
    return str(path)


def run(*args, check=True, timeout=120, **kw):
    """Run a command, capture text output, fail loudly on a timeout."""
    proc = subprocess.run([str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# ---- helpers for the qemu-io interop tests (test_io_*.py, test_locking.py)


# qemu-io's second report line: "512 bytes, 1 ops; 00.00 sec (...)".
TIMING_RE = re.compile(
    r"^[0-9.]+ (bytes|KiB|MiB|GiB|TiB|PiB|EiB), [0-9]+ ops; "
    r"[0-9:.]+ sec \([0-9.]+ (bytes|KiB|MiB|GiB|TiB|PiB|EiB)/sec and "
    r"[0-9.]+ ops/sec\)$")


def drop_timing(text):
    """TEXT's lines without qemu-io's timing lines, which differ per run.
    Fails when a line looks like a timing line but is malformed."""
    lines = []
    for line in text.splitlines():
        if " ops; " in line:
            assert TIMING_RE.match(line), f"malformed timing line: {line!r}"
            continue
        lines.append(line)
    return lines


def file_state(path):
    """(size, sha256) of the file at PATH, to prove it was not touched."""
    data = Path(path).read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def io_cmds(*cmds):
    """["-c", CMD, ...] for qemu-io and strata-io."""
    args = []
    for c in cmds:
        args += ["-c", c]
    return args


def make_image(path, size=0, data=None):
    """Create a raw image at PATH: DATA if given, else SIZE sparse bytes."""
    path = Path(path)
    if data is not None:
        path.write_bytes(data)
    else:
        with open(path, "wb") as f:
            f.truncate(size)
    return path


# ---- -p: strata-img draws progress only on a terminal -------------------

QEMU_PROGRESS_RE = re.compile(r"(?:    \(\d+\.\d\d/100%\)[\r\n])+\n?")


def drop_qemu_progress(text):
    """qemu-img -p writes "    (xx.xx/100%)\\r" steps and a newline even
    into a pipe; strata-img writes nothing there.  What remains to
    compare."""
    if isinstance(text, bytes):
        return QEMU_PROGRESS_RE.sub("", text.decode()).encode()
    return QEMU_PROGRESS_RE.sub("", text)


def run_on_pty(argv, cwd=None, timeout=120):
    """Run ARGV with stdout and stderr on a pseudo-terminal; returns the
    exit status and everything it wrote."""
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:
        try:
            if cwd:
                os.chdir(cwd)
            os.execv(str(argv[0]), [str(a) for a in argv])
        finally:
            os._exit(127)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if not r:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


PROGRESS_BAR_RE = re.compile(
    r"\r\[[# ]{30}\] +100\.00%  +[0-9.]+ [KMGTPE]?i?B/s")


def assert_progress_bar(text):
    """The bar strata-img draws on a terminal reached 100 %, with a rate."""
    assert "\r[" in text and PROGRESS_BAR_RE.search(text), repr(text)


def build_libstrata_program(tmp_dir, source):
    """Compile tests/integration/SOURCE against the build's libstrata.a,
    with the build's sanitizers, into TMP_DIR; returns the program's path.
    Tests use this for C drivers that call the library directly."""
    cc = need("cc", "gcc")
    lib = BUILD / "libstrata.a"
    if not lib.exists():
        pytest.fail(f"{lib} not built: run 'make' first")
    opts = json.loads((BUILD / "meson-info" / "intro-buildoptions.json")
                      .read_text())
    san = next((o["value"] for o in opts if o["name"] == "b_sanitize"),
               "none")
    flags = [f"-fsanitize={san}"] if san not in ("none", "") else []
    out = tmp_dir / os.path.splitext(source)[0]
    # The build's include/ holds the generated strata/version.h.
    run(cc, *flags, "-O1", "-pthread", "-I", BUILD / "include",
        "-I", TOP / "include", "-o", out, HERE / source, lib,
        "-lz", "-lzstd", "-ljansson", "-lnbd")
    return out
