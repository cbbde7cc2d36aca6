#!/usr/bin/env bash
# Run every test: the C unit tests (through meson) and the Python
# integration tests (pytest), then print one closing line
# "N passed, N failed" that counts both.  Exit non-zero when any failed.
#   scripts/run-tests.sh [BUILD_DIR]
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
export STRATA_BUILD=$build

passed=0
failed=0

# Unit tests: meson runs each test program; each program prints its own
# "N passed, N failed" line, which is what we count.  A program that died
# without printing it counts as one failure.
meson test -C "$build" --suite unit --print-errorlogs >"$build/unit.out" 2>&1
grep -E '^ *[0-9]+/[0-9]+ ' "$build/unit.out" || tail -20 "$build/unit.out"
py=/usr/bin/python3
[[ -x $py ]] || py=python3
counts=$($py - "$build/meson-logs/testlog.json" <<'PY'
import json, re, sys
p = f = 0
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    print("0 1"); sys.exit()
for line in lines:
    t = json.loads(line)
    m = re.findall(r"^(\d+) passed, (\d+) failed$", t.get("stdout", ""), re.M)
    if m:
        p += int(m[-1][0]); f += int(m[-1][1])
    if t.get("result") != "OK" and (not m or int(m[-1][1]) == 0):
        f += 1
        print(f"unit test {t.get('name')} {t.get('result')}", file=sys.stderr)
print(p, f)
PY
)
passed=$((passed + ${counts% *}))
failed=$((failed + ${counts#* }))

# Integration tests, spread over worker processes with pytest-xdist (the
# tests share nothing: each uses its own temporary directory, sockets and
# ports).  STRATA_TEST_WORKERS=0 runs them in this process, one by one.
workers=${STRATA_TEST_WORKERS:-$(( $(nproc) * 2 ))}
xdist=()
if ((workers > 0)) && $py -c 'import xdist' 2>/dev/null; then
  xdist=(-n "$workers")
fi
report=$(mktemp)
trap 'rm -f "$report"' EXIT
$py -m pytest -q -p no:cacheprovider "${xdist[@]}" "$top/tests/integration" \
    --junitxml="$report" ${PYTEST_ARGS:-} 2>&1 | tail -n 60
counts=$($py - "$report" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("0 1"); sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
t = f = 0
for s in suites:
    t += int(s.get("tests", 0)); f += int(s.get("failures", 0)) + int(s.get("errors", 0))
    t -= int(s.get("skipped", 0))
print(t - f, f)
PY
)
passed=$((passed + ${counts% *}))
failed=$((failed + ${counts#* }))

echo "$passed passed, $failed failed"
((failed == 0))
