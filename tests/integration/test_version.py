"""Every program's --version, and the public header's version macros, say
the project version written once in meson.build.

include/strata/version.h is generated from it (configure_file) and
strata_version() is built from those macros; the programs print
strata_version(), so a release changes one line.  The QMP side
(query-version) is checked by test_qmp_server.py and
test_strata_client.py.
"""
import re

import pytest

from harness import BUILD, TOP, binary, run

PROGRAMS = ("strata-img", "strata-io", "strata-nbd", "stratad", "strata")


def project_version():
    text = (TOP / "meson.build").read_text()
    m = re.search(r"project\([^)]*version\s*:\s*'([0-9.]+)'", text, re.S)
    assert m, "no version in meson.build's project()"
    return m.group(1)


@pytest.mark.parametrize("prog", PROGRAMS)
@pytest.mark.parametrize("opt", ("--version", "-V"))
def test_version_option(prog, opt):
    p = run(binary(prog), opt)
    assert p.stdout == f"{prog} version {project_version()}\n"
    assert p.stderr == ""


def test_version_header_macros():
    """The generated header carries the numbers of meson's version."""
    text = (BUILD / "include" / "strata" / "version.h").read_text()
    major, minor, micro = project_version().split(".")
    for name, value in (("MAJOR", major), ("MINOR", minor),
                        ("MICRO", micro)):
        assert re.search(rf"^#define STRATA_VERSION_{name} {value}$", text,
                         re.M), name


def test_no_hard_coded_version_in_sources():
    """No program or module spells the version itself."""
    version = re.escape(project_version())
    bad = []
    for path in (TOP / "src").rglob("*.[ch]"):
        text = path.read_text()
        if re.search(rf'"[^"\n]*\b{version}\b', text) \
                or re.search(r"\bSTRATA_VERSION\b(?!_)", text):
            bad.append(str(path.relative_to(TOP)))
    assert bad == []
