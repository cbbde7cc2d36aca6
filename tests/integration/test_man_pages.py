"""Every option a program accepts appears in its manual page.

The options come from the program's own sources, as meson builds them
(meson introspect names each executable's files; the tool headers they
include are read too): the long names of its struct option tables and the
letters of its getopt() option strings, including strata-io's commands
and strata-img's subcommands.  The pages are the roff files scdoc
generated from docs/man/*.scd in the build directory.  An option added
without documentation fails here, naming it.
"""
import json
import re
import subprocess

import pytest

from harness import BUILD, TOP

PAGES = {"strata-img": "strata-img.1", "strata-io": "strata-io.1",
         "strata-nbd": "strata-nbd.8", "stratad": "stratad.8",
         "strata": "strata.1"}

LONG = re.compile(r'\{\s*"([a-z][a-z0-9-]*)"\s*,\s*'
                  r'(?:no|required|optional)_argument')
GETOPT = re.compile(r'\bgetopt(?:_long(?:_only)?)?\s*\(\s*\w+\s*,\s*\w+\s*,'
                    r'\s*([^,)]*)')
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
TOOL_HEADER = re.compile(r'#\s*include\s+"(tools/[^"]+\.h)"')


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def options_in(text):
    """(long names, short letters) that C source TEXT accepts."""
    text = strip_comments(text)
    longs = set(LONG.findall(text))
    shorts = set()
    for arg in GETOPT.findall(text):
        for literal in STRING.findall(arg):
            shorts |= {c for c in literal if c not in "+-:"}
    return longs, shorts


def documented(page_text):
    """(long names, short letters) that a roff page mentions."""
    text = re.sub(r"\\f[BIRP]|\\&|\\\(.{2}", "", page_text)
    text = text.replace("\\-", "-")
    longs = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", text))
    shorts = set()
    # "-f" alone, or a cluster of flags such as qemu-io's "[-bCpqv]".
    for cluster in re.findall(r"(?<![\w-])-([A-Za-z0-9]+)", text):
        shorts |= set(cluster)
    return longs, shorts


def missing(source_text, page_text):
    longs, shorts = options_in(source_text)
    dlongs, dshorts = documented(page_text)
    return (sorted(f"--{o}" for o in longs - dlongs)
            + sorted(f"-{c}" for c in shorts - dshorts))


def program_sources():
    """Each program's C sources and the tool headers they include."""
    out = subprocess.run(["meson", "introspect", str(BUILD), "--targets"],
                         capture_output=True, text=True, check=True)
    sources = {}
    for t in json.loads(out.stdout):
        if t["type"] == "executable" and t["name"] in PAGES:
            sources[t["name"]] = [s for ts in t["target_sources"]
                                  for s in ts.get("sources", [])]
    return sources


def source_text(files):
    texts, seen = [], set()
    queue = list(files)
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        texts.append(text)
        queue += [str(TOP / "src" / h) for h in TOOL_HEADER.findall(text)]
    return "\n".join(texts)


@pytest.mark.parametrize("program", sorted(PAGES))
def test_every_option_documented(program):
    sources = program_sources()
    assert program in sources, f"meson builds no executable {program}"
    page = BUILD / "docs" / "man" / PAGES[program]
    assert page.exists(), f"{page} not generated (is scdoc installed?)"
    text = source_text(sources[program])
    longs, shorts = options_in(text)
    assert "help" in longs and "h" in shorts, "option extraction found none"
    assert missing(text, page.read_text()) == []


def test_checker_reports_an_undocumented_option():
    """The check can fail: a new option and a new flag, not in the page."""
    src = ('static const struct option o[] = {\n'
           '  { "frobnicate", no_argument, NULL, \'Z\' },\n'
           '  { "help", no_argument, NULL, \'h\' },\n};\n'
           'getopt_long (argc, argv, "+hZ", o, NULL);\n'
           'getopt (argc, argv, flag ? "+q" : "+qK");\n')
    page = ".B \\-h\\fR, \\fB--help\\fR\n[\\fB-q\\fR]\n"
    assert missing(src, page) == ["--frobnicate", "-K", "-Z"]


def test_pages_render():
    """man(1) formats each generated page without warnings."""
    for name in PAGES.values():
        p = subprocess.run(["man", "--warnings", "-l",
                            str(BUILD / "docs" / "man" / name)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (name, p.stderr)
        assert p.stderr == "", (name, p.stderr)
        assert "NAME" in p.stdout and "OPTIONS" in p.stdout, name
