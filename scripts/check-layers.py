#!/usr/bin/env python3
"""Keep strata's layering true (docs/architecture.md, "Layers").

The layers of src/, lowest first:

    util  <  block  <  drivers  <  nbd, jobs  <  control  <  tools

A file may include headers of its own directory and of the layers below it,
never of a layer above, nor of a sibling on its own level (nbd and jobs do
not know each other).  <strata/...> (the public header) is allowed
everywhere.  Two more rules:

  * the core names no driver: nothing in src/block/ mentions a particular
    driver's struct strata_driver (qcow2_driver, nbd_driver, ...) or a
    driver's functions (nbd_is_uri, file_create, ...); drivers register
    themselves through the list in src/drivers/;
  * QMP's JSON stops at src/control/: no file below it includes jansson or
    names json_t or struct qmp_error (jobs, exports and the graph take typed
    C parameters);
  * src/tools/ sees only include/ and src/util/, except that stratad and
    strata-nbd may use the modules they serve through those modules' own
    headers (ALLOWED_TOOL_HEADERS below).

Usage: check-layers.py [SRC_TOP]      exit 0 when the tree keeps the rules
       check-layers.py --self-test    plant violations in a scratch tree and
                                      make sure each one is found
Prints one line per violation and ends with "N passed, N failed" (one
count per rule), as the unit tests do.
"""
import os
import re
import sys
import tempfile

RANK = {"util": 0, "block": 1, "drivers": 2, "nbd": 3, "jobs": 3,
        "control": 4, "tools": 5}

# Headers of a higher layer that a tool may include: the daemon and the NBD
# server program drive the modules they exist to serve.
# meson builds src/tools/ with only include/ and src/util/ on its include
# path (plus src/control/ for stratad and strata, src/nbd/ for strata-nbd),
# so tools name headers bare ("opts.h"); a bare name is resolved here the
# way the compiler would, and must land in tools/, util/ or the one module
# header the program is allowed.
ALLOWED_TOOL_HEADERS = {
    "stratad.c": ("control/control.h",),
    "strata-nbd.c": ("nbd/server.h",),
    "strata.c": ("control/control.h",),
}

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
# A driver object or a driver's own entry points named from the core.
DRIVER_NAME = re.compile(
    r"\b(?!strata_driver\b)[a-z0-9_]+_driver\b"
    r"|\bnbd_(?:is_uri|uri_\w+)\b|\bfile_create\b")


def layer_of(path):
    """The layer of a path relative to src/, or None."""
    top = path.split("/", 1)[0]
    return top if top in RANK else None


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def sources(src):
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            if f.endswith((".c", ".h")):
                full = os.path.join(dirpath, f)
                yield os.path.relpath(full, src), full


def check_includes(src):
    bad = []
    for rel, full in sources(src):
        mine = layer_of(rel)
        if mine is None:
            continue
        with open(full, encoding="utf-8", errors="replace") as fp:
            text = fp.read()
        for lineno, line in enumerate(text.splitlines(), 1):
            m = INCLUDE.match(line)
            if not m:
                continue
            header = m.group(1)
            theirs = layer_of(header)
            if mine != "tools" and (theirs is None or theirs == mine):
                continue
            if mine == "tools":
                base = os.path.basename(rel)
                allowed = ALLOWED_TOOL_HEADERS.get(base, ())
                if "/" not in header:
                    if any(os.path.exists(os.path.join(src, d, header))
                           for d in ("tools", "util")):
                        continue
                    where = [a for a in allowed
                             if os.path.basename(a) == header]
                    if where:
                        continue
                elif theirs == "util" or header in allowed:
                    continue
                bad.append(f"src/{rel}:{lineno}: a tool includes {header}; "
                           "tools see only <strata/...> and util/")
                continue
            if RANK[theirs] >= RANK[mine]:
                what = "sibling" if RANK[theirs] == RANK[mine] else "higher"
                bad.append(f"src/{rel}:{lineno}: {mine}/ includes {header} "
                           f"from a {what} layer ({theirs}/)")
    return bad


def check_core_names_no_driver(src):
    bad = []
    block = os.path.join(src, "block")
    for rel, full in sources(block):
        with open(full, encoding="utf-8", errors="replace") as fp:
            text = strip_comments(fp.read())
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in DRIVER_NAME.finditer(line):
                bad.append(f"src/block/{rel}:{lineno}: the core names a "
                           f"driver ({m.group(0)})")
    return bad


JSON = re.compile(r"\bjson_t\b|\bstruct\s+qmp_error\b|<jansson\.h>")
BELOW_CONTROL = ("util", "block", "drivers", "nbd", "jobs")


def check_json_stops_at_control(src):
    bad = []
    for rel, full in sources(src):
        if layer_of(rel) not in BELOW_CONTROL:
            continue
        with open(full, encoding="utf-8", errors="replace") as fp:
            text = strip_comments(fp.read())
        for lineno, line in enumerate(text.splitlines(), 1):
            m = JSON.search(line)
            if m:
                bad.append(f"src/{rel}:{lineno}: {m.group(0)} below "
                           "src/control/ (QMP's JSON stops at control)")
    return bad


RULES = [
    ("layers", check_includes),
    ("core names no driver", check_core_names_no_driver),
    ("JSON stops at control", check_json_stops_at_control),
]


def run(src, out=sys.stdout):
    passed = failed = 0
    for name, rule in RULES:
        bad = rule(src)
        for line in bad:
            print(line, file=out)
        if bad:
            print(f"rule '{name}': {len(bad)} violation(s)", file=out)
            failed += 1
        else:
            passed += 1
    print(f"{passed} passed, {failed} failed", file=out)
    return failed == 0


def self_test():
    """Each planted violation must be reported; a clean tree must pass."""
    import io

    cases = {
        "block/x.c": ('#include "drivers/qcow2/qcow2.h"\n', "higher layer"),
        "util/x.c": ('#include "block/node.h"\n', "higher layer"),
        "jobs/x.c": ('#include "nbd/server.h"\n', "sibling layer"),
        "nbd/x.c": ('#include "control/qmp.h"\n', "higher layer"),
        "tools/strata-img.c": ('#include "block/node.h"\n', "a tool includes"),
        "tools/img-x.c": ('#include "node.h"\n', "a tool includes"),
        "tools/strata-io.c": ('#include "control.h"\n', "a tool includes"),
        "block/y.c": ("int f (void) { return nbd_is_uri (0); }\n",
                      "names a driver"),
        "block/z.c": ("extern int qcow2_driver;\n", "names a driver"),
        "jobs/j.c": ("#include <jansson.h>\njson_t *args;\n",
                     "QMP's JSON stops at control"),
        "nbd/q.c": ("struct qmp_error *err;\n", "QMP's JSON stops at control"),
    }
    clean = {
        "block/ok.c": ('#include "util/error.h"\n#include <strata/strata.h>\n'
                       "/* qcow2_driver in a comment is fine */\n"
                       "struct strata_driver d;\n"),
        "control/ok.c": ('#include "jobs/job.h"\n#include "nbd/server.h"\n'
                         "#include <jansson.h>\njson_t *reply;\n"),
        "tools/stratad.c": ('#include "control/control.h"\n'
                            '#include "control.h"\n#include "opts.h"\n'),
        "tools/strata-io.c": ('#include "util/opts.h"\n#include "opts.h"\n'
                              '#include "img.h"\n'),
        "tools/img.h": "",
        "util/opts.h": "",
        "control/control.h": "",
        "block/node.h": "",
    }
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel, text in clean.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "w") as fp:
                fp.write(text)
        out = io.StringIO()
        if not run(tmp, out):
            print("self-test: a clean tree was refused:\n" + out.getvalue())
            failures += 1
        for rel, (text, expect) in cases.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            saved = open(path).read() if os.path.exists(path) else None
            with open(path, "w") as fp:
                fp.write(text)
            out = io.StringIO()
            ok = run(tmp, out)
            if ok or expect not in out.getvalue() or rel not in out.getvalue():
                print(f"self-test: {rel} ({expect}) was not reported:\n"
                      + out.getvalue())
                failures += 1
            if saved is None:
                os.unlink(path)
            else:
                with open(path, "w") as fp:
                    fp.write(saved)
    n = len(cases) + 1
    print(f"{n - failures} passed, {failures} failed")
    return failures == 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return 0 if self_test() else 1
    top = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..")
    return 0 if run(os.path.join(top, "src")) else 1


if __name__ == "__main__":
    sys.exit(main())
