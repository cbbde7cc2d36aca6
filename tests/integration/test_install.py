"""make install's result, used as a stranger would use it.

The build directory under test is installed with DESTDIR into a per-test
staging directory (its configured prefix is kept: nothing is
reconfigured; meson install only brings the build up to date), then:
  - a small C program is built against the staged library with
    `pkg-config --cflags --libs strata` (PKG_CONFIG_SYSROOT_DIR maps the
    .pc file's paths into the staging directory) and run with
    LD_LIBRARY_PATH there: it creates, opens, writes and reads an image
    through the public API and checks the version call against the
    installed header's macros;
  - libstrata.so.0 carries its soname and exports exactly the functions
    the public header declares, all strata_*, under version STRATA_0.1;
  - `man -l` renders the installed strata-img page;
  - uninstall (meson's, which `make uninstall` runs) leaves no file.
meson records installed files in BUILD/meson-logs/install-log.txt, which
uninstall reads; the test puts back the log a developer's own install
left there.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from harness import BUILD, TOP, need, run

PROGRAMS = ("strata-img", "strata-io", "strata-nbd", "stratad", "strata")
MAN_PAGES = ("man1/strata-img.1", "man1/strata-io.1", "man1/strata.1",
             "man8/strata-nbd.8", "man8/stratad.8")

PROGRAM_C = r"""
#include <stdio.h>
#include <string.h>
#include <strata/strata.h>

#define STR(x) #x
#define XSTR(x) STR (x)

static int
fail (const char *what, strata_error *err)
{
  fprintf (stderr, "%s: %s\n", what, err ? strata_error_message (err) : "");
  strata_error_free (err);
  return 1;
}

int
main (int argc, char **argv)
{
  const char *img = argv[1];
  strata_error *err = NULL;
  struct strata_bitmap_info **bitmaps;
  size_t nbitmaps;
  char buf[4096], back[4096];
  strata_node *n;

  if (argc != 2)
    return 2;
  if (strcmp (strata_version (), XSTR (STRATA_VERSION_MAJOR) "."
              XSTR (STRATA_VERSION_MINOR) "." XSTR (STRATA_VERSION_MICRO))
      || strata_version_number ()
             != STRATA_VERSION_NUMBER (STRATA_VERSION_MAJOR,
                                       STRATA_VERSION_MINOR,
                                       STRATA_VERSION_MICRO))
    return fail ("version", NULL);
  if (!strata_create (img, "qcow2", "size=1M", 0, &err))
    return fail ("create", err);
  if (!(n = strata_open (img, "qcow2", NULL, STRATA_OPEN_RDWR, &err)))
    return fail ("open", err);
  memset (buf, 0x5a, sizeof buf);
  if (strata_pwrite (n, buf, sizeof buf, 65536, 0) < 0
      || strata_flush (n, 0) < 0)
    return fail ("write", NULL);
  strata_close (n);
  if (!(n = strata_open (img, NULL, NULL, 0, &err)))
    return fail ("reopen", err);
  if (strata_length (n) != 1 << 20
      || strata_pread (n, back, sizeof back, 65536, 0) < 0
      || memcmp (buf, back, sizeof buf) != 0)
    return fail ("read back", NULL);
  if (!strata_bitmap_list (n, &bitmaps, &nbitmaps, 0, &err))
    return fail ("bitmaps", err);
  strata_bitmap_list_free (bitmaps);
  strata_close (n);
  printf ("strata %s ok, %zu bitmaps\n", strata_version (), nbitmaps);
  return 0;
}
"""


def build_options():
    out = run("meson", "introspect", BUILD, "--buildoptions")
    return {o["name"]: o["value"] for o in json.loads(out.stdout)}


def staged(stage, *parts):
    """A path under the staging directory for an absolute install path."""
    return stage.joinpath(*(p.lstrip("/") for p in parts))


@pytest.fixture
def installed(tmp_path):
    need("pkg-config", "pkg-config")
    need("man", "man-db")
    stage = tmp_path / "stage"
    log = BUILD / "meson-logs" / "install-log.txt"
    saved = log.read_bytes() if log.exists() else None
    try:
        run("meson", "install", "-C", BUILD, "--quiet",
            "--destdir", stage, timeout=300)
        yield stage
    finally:
        # Uninstall what this test installed, whatever happened.
        subprocess.run(["ninja", "-C", str(BUILD), "uninstall"],
                       capture_output=True, timeout=120)
        if saved is not None:
            log.write_bytes(saved)
        elif log.exists():
            log.unlink()


def test_install_build_and_run_against_it(tmp_path, installed):
    stage = installed
    o = build_options()
    prefix = o["prefix"]
    libdir = os.path.join(prefix, o["libdir"])
    incdir = os.path.join(prefix, o["includedir"])
    bindir = os.path.join(prefix, o["bindir"])
    mandir = os.path.join(prefix, o["mandir"])

    for p in PROGRAMS:
        assert os.access(staged(stage, bindir, p), os.X_OK), p
    for h in ("strata.h", "version.h"):
        assert staged(stage, incdir, "strata", h).is_file(), h
    lib = staged(stage, libdir, "libstrata.so.0")
    assert lib.is_file()
    assert os.readlink(staged(stage, libdir, "libstrata.so")) \
        == "libstrata.so.0"
    for m in MAN_PAGES:
        assert staged(stage, mandir, m).is_file(), m

    env = dict(os.environ,
               PKG_CONFIG_PATH=str(staged(stage, libdir, "pkgconfig")),
               PKG_CONFIG_SYSROOT_DIR=str(stage),
               PKG_CONFIG_LIBDIR="")
    flags = run("pkg-config", "--cflags", "--libs", "strata",
                env=env).stdout.split()
    assert f"-I{staged(stage, incdir)}" in flags
    assert f"-L{staged(stage, libdir)}" in flags and "-lstrata" in flags
    version = json.loads(run("meson", "introspect", BUILD,
                             "--projectinfo").stdout)["version"]
    assert run("pkg-config", "--modversion", "strata",
               env=env).stdout.strip() == version
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM_C)
    cc = shutil.which("cc") or need("gcc", "gcc")
    exe = tmp_path / "prog"
    # A sanitized build's library needs the program built the same way.
    sanitize = [f"-fsanitize={o['b_sanitize']}"] \
        if o.get("b_sanitize", "none") != "none" else []
    run(cc, "-std=c11", "-Wall", "-Werror", *sanitize, src, "-o", exe,
        *flags)
    needed = run("readelf", "-d", exe).stdout
    assert "Shared library: [libstrata.so.0]" in needed
    p = run(exe, tmp_path / "t.qcow2",
            env=dict(os.environ, LD_LIBRARY_PATH=str(staged(stage, libdir))))
    assert p.stdout == f"strata {version} ok, 0 bitmaps\n"
    # The image is a real qcow2 image.
    qemu_img = need("qemu-img", "qemu-utils")
    run(qemu_img, "check", tmp_path / "t.qcow2")


def header_functions():
    text = (TOP / "include" / "strata" / "strata.h").read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return set(re.findall(r"\b(strata_\w+)\s*\(", text))


def test_library_exports_only_the_public_api(installed):
    o = build_options()
    lib = staged(installed, o["prefix"], o["libdir"], "libstrata.so.0")
    dyn = run("readelf", "-d", lib).stdout
    assert "Library soname: [libstrata.so.0]" in dyn
    syms = run("nm", "-D", "--defined-only", lib).stdout.split("\n")
    exported = {line.split()[-1].split("@")[0] for line in syms
                if line.strip() and line.split()[-2] != "A"}
    assert exported == header_functions()
    assert all(s.startswith("strata_") for s in exported)
    versions = run("readelf", "--dyn-syms", "-W", lib).stdout
    assert "strata_open@@STRATA_0.1" in versions


def test_installed_man_page_renders(installed):
    o = build_options()
    page = staged(installed, o["prefix"], o["mandir"], "man1",
                  "strata-img.1")
    p = run("man", "-l", page, env=dict(os.environ, MANWIDTH="80"))
    assert re.search(r"strata-img - create, inspect", p.stdout)
    assert "--backing-chain" in p.stdout


def test_uninstall_leaves_no_file(tmp_path):
    stage = tmp_path / "stage"
    log = BUILD / "meson-logs" / "install-log.txt"
    saved = log.read_bytes() if log.exists() else None
    try:
        run("meson", "install", "-C", BUILD, "--quiet",
            "--destdir", stage, timeout=300)
        files = [p for p in stage.rglob("*") if not p.is_dir()]
        assert len(files) >= len(PROGRAMS) + len(MAN_PAGES) + 5
        run("ninja", "-C", BUILD, "uninstall", timeout=120)
        assert [p for p in stage.rglob("*") if not p.is_dir()] == []
    finally:
        if saved is not None:
            log.write_bytes(saved)
