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

# Unit tests.
meson_out=$(meson test -C "$build" --suite unit --print-errorlogs 2>&1)
meson_rc=$?
echo "$meson_out" | grep -E '^ *[0-9]+/[0-9]+ ' || true
ok=$(echo "$meson_out" | sed -n 's/^Ok: *\([0-9]*\).*/\1/p' | tail -1)
bad=$(echo "$meson_out" | sed -n 's/^Fail: *\([0-9]*\).*/\1/p' | tail -1)
to=$(echo "$meson_out" | sed -n 's/^Timeout: *\([0-9]*\).*/\1/p' | tail -1)
passed=$((passed + ${ok:-0}))
failed=$((failed + ${bad:-0} + ${to:-0}))
if ((meson_rc != 0)); then
  echo "$meson_out" | tail -40
  if ((${bad:-0} + ${to:-0} == 0)); then
    failed=$((failed + 1))  # meson itself failed
  fi
fi

# Integration tests.
py=/usr/bin/python3
[[ -x $py ]] || py=python3
report=$(mktemp)
trap 'rm -f "$report"' EXIT
$py -m pytest -q -p no:cacheprovider "$top/tests/integration" \
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
