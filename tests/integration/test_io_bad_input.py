"""strata-io refuses bad input as qemu-io does, and touches nothing.

Each case runs strata-io and qemu-io on two copies of one image.  strata-io
must exit non-zero where qemu-io does, print one line that names the
problem (and the file, when opening failed), and leave the image's bytes
and size exactly as they were.
"""
import random

import pytest

from harness import file_state, io_cmds, make_image, run

MiB = 1024 * 1024
SIZE = MiB

# name: (commands, text the one error line must contain)
COMMAND_CASES = {
    "read-past-end": (["read 1048575 2"], "read failed: Input/output error"),
    "read-at-end": (["read 1M 1"], "read failed: Input/output error"),
    "write-past-end": (["write -P 0x11 1048575 2"],
                       "write failed: Input/output error"),
    "write-far-past-end": (["write 0x7ffffffffffffe00 512"],
                           "write failed: Input/output error"),
    "zero-past-end": (["write -z 1048064 1024"],
                      "write failed: Input/output error"),
    "unmap-past-end": (["write -z -u 1M 4096"],
                       "write failed: Input/output error"),
    "discard-past-end": (["discard 0x7fffffffffffffff 2"],
                         "discard failed: Input/output error"),
    "read-length-overflow": (["read 0 0x7fffffffffffffff"],
                             "length cannot exceed 2147483136"),
    "write-length-overflow": (["write 0 0x7fffffffffffffff"],
                              "length cannot exceed 2147483136"),
    "length-just-over": (["read 0 2147483137"],
                         "length cannot exceed 2147483136, given 2147483137"),
    "number-too-large": (["write 0 0xffffffffffffffff"],
                         "Parsing error: argument too large -- "
                         "0xffffffffffffffff"),
    "offset-too-large": (["write 8E 1"],
                         "Parsing error: argument too large -- 8E"),
    "negative-length": (["write 0 -1"], "-1"),
    "negative-offset": (["write -1 1"], "-- '1'"),
    "garbage-offset": (["write abc 1"],
                       "Parsing error: non-numeric argument, or "
                       "extraneous/unrecognized suffix -- abc"),
    "garbage-suffix": (["write 0 12q"], "suffix -- 12q"),
    "garbage-truncate": (["truncate 1k5"], "suffix -- 1k5"),
    "pattern-too-big": (["write -P 300 0 1"],
                        "300 is not a valid pattern byte"),
    "pattern-garbage": (["write -P zz 0 1"], "zz is not a valid pattern byte"),
    "pattern-negative": (["read -P -1 0 1"], "-1 is not a valid pattern byte"),
    "zero-and-pattern": (["write -z -P 1 0 1"], "-P"),
    "unmap-without-zero": (["write -u 0 1"], "-u requires -z"),
    "unknown-command": (["frobnicate 0 1"], 'command "frobnicate" not found'),
    "unknown-option": (["write -X 0 1"], "invalid option"),
    "read-one-arg": (["read 0"], "bad argument count 1 to read"),
    "write-no-args": (["write"], "bad argument count 0 to write"),
    "write-three-args": (["write 0 1 2"], "write"),
    "length-extra-arg": (["length 1"], "bad argument count 1 to length"),
    "map-extra-arg": (["map x"], "bad argument count 1 to map"),
    "truncate-no-args": (["truncate"], "bad argument count 0 to truncate"),
    "truncate-too-many": (["truncate 1 2 3 4"],
                          "bad argument count 4 to truncate"),
}


@pytest.fixture
def images(tmp_path):
    """Two identical raw images with random contents: strata's and qemu's."""
    data = random.Random(1).randbytes(SIZE)
    return (make_image(tmp_path / "s.raw", data=data),
            make_image(tmp_path / "q.raw", data=data))


def one_line(proc):
    """The single line strata-io printed; fails if it printed more."""
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{lines}"
    return lines[0]


@pytest.mark.parametrize("name", sorted(COMMAND_CASES))
def test_bad_command(images, strata_io, qemu_io, name):
    cmds, expect = COMMAND_CASES[name]
    s_img, q_img = images
    before = file_state(s_img)
    q = run(qemu_io, "-f", "raw", *io_cmds(*cmds), q_img, check=False)
    s = run(strata_io, "-f", "raw", *io_cmds(*cmds), s_img, check=False)
    assert q.returncode != 0, f"qemu-io accepted {cmds}: oracle changed?"
    assert s.returncode == q.returncode, s.stdout + s.stderr
    assert expect in one_line(s)
    assert file_state(s_img) == before
    assert file_state(q_img) == before  # and qemu-io agrees nothing changed


def test_failed_command_does_not_stop_the_rest(images, strata_io):
    s_img, _ = images
    before = file_state(s_img)
    s = run(strata_io, "-f", "raw", *io_cmds("write 1048575 2", "read 0 1",
                                             "write -P 300 0 1", "length"),
            s_img, check=False)
    assert s.returncode == 1
    assert "read 1/1 bytes at offset 0" in s.stdout
    assert s.stdout.splitlines()[-1] == "1 MiB"
    assert file_state(s_img) == before


def open_cases(tmp_path):
    img = make_image(tmp_path / "s.raw", data=b"\x5a" * 4096)
    missing = tmp_path / "missing.raw"
    return img, {
        "missing-file": (["-f", "raw"], missing,
                         [str(missing), "No such file or directory"]),
        "directory": (["-f", "raw"], tmp_path,
                      [str(tmp_path), "Is a directory"]),
        "unknown-format": (["-f", "foo"], img,
                           [str(img), "Unknown driver 'foo'"]),
        "bad-cache-mode": (["-f", "raw", "-t", "bogus"], img,
                           ["Invalid cache option: bogus"]),
        "force-share-rw": (["-f", "raw", "-U"], img,
                           [str(img), "force-share", "read-only"]),
        "no-file": (["-f", "raw"], None, []),
    }


OPEN_CASE_NAMES = ["missing-file", "directory", "unknown-format",
                   "bad-cache-mode", "force-share-rw", "no-file"]


@pytest.mark.parametrize("name", OPEN_CASE_NAMES)
def test_bad_open(tmp_path, strata_io, qemu_io, name):
    img, cases = open_cases(tmp_path)
    opts, target, expect = cases[name]
    before = file_state(img)
    files = [target] if target is not None else []
    cmds = io_cmds("write -P 0x11 0 512")
    q = run(qemu_io, *opts, *cmds, *files, check=False)
    s = run(strata_io, *opts, *cmds, *files, check=False)
    assert q.returncode != 0
    assert s.returncode == q.returncode, s.stdout + s.stderr
    assert s.stdout == ""
    line = one_line(s)
    assert line.startswith("strata-io: "), line
    for text in expect:
        assert text in line
    assert file_state(img) == before
    assert not (tmp_path / "missing.raw").exists()  # never created


def test_read_only_refuses_writes(images, strata_io, qemu_io):
    s_img, q_img = images
    before = file_state(s_img)
    cmds = io_cmds("write 0 1", "write -z 0 4096", "discard 0 4096",
                   "truncate 4096")
    q = run(qemu_io, "-f", "raw", "-r", *cmds, q_img, check=False)
    s = run(strata_io, "-f", "raw", "-r", *cmds, s_img, check=False)
    assert q.returncode == 1
    assert s.returncode == 1
    assert "wrote" not in s.stdout and "discard 4096/" not in s.stdout
    # Each of the four says why it was refused.
    assert (s.stdout + s.stderr).count("read-only") == 4, s.stdout + s.stderr
    assert file_state(s_img) == before
    assert file_state(q_img) == before


def test_force_share_read_only_leaves_image_alone(images, strata_io):
    s_img, _ = images
    before = file_state(s_img)
    data = s_img.read_bytes()
    s = run(strata_io, "-f", "raw", "-U", "-r",
            *io_cmds(f"read -P {data[7]:#x} 7 1", "write 0 1"), s_img,
            check=False)
    assert "read 1/1 bytes at offset 7" in s.stdout
    assert s.returncode == 1  # the write was refused
    assert file_state(s_img) == before
