"""Shared fixtures for strata's integration tests.

The binaries under test come from the build directory named by
$STRATA_BUILD (default: build/ at the top of the tree).  QEMU's and libnbd's
tools are the oracles; a test that needs a missing peer fails and says
what to install (scripts/deps.sh installs them all) instead of skipping.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
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


@pytest.fixture
def strata_io():
    return binary("strata-io")


@pytest.fixture
def qemu_io():
    return need("qemu-io", "qemu-utils")


@pytest.fixture
def qemu_img():
    return need("qemu-img", "qemu-utils")
