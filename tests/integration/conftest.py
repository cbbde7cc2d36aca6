"""Shared fixtures for strata's integration tests.

The helpers live in the harness package (tests/integration/harness/);
this file only holds pytest fixtures: the tools' paths and the reaper
that kills, by PID, every process a test started through the harness and
left running.  The names tests used to import from here are re-exported
for tests written before the harness.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import procs  # noqa: E402
from harness.env import (BUILD, TIMING_RE, TOP,  # noqa: E402,F401
                         assert_progress_bar, binary, drop_qemu_progress,
                         drop_timing, file_state, io_cmds, make_image, need,
                         run, run_on_pty)


@pytest.fixture(autouse=True)
def reap_processes():
    """Kill (by PID) any process a failed test left running."""
    yield
    procs.reap()


@pytest.fixture
def strata_io():
    return binary("strata-io")


@pytest.fixture
def qemu_io():
    return need("qemu-io", "qemu-utils")


@pytest.fixture
def qemu_img():
    return need("qemu-img", "qemu-utils")
