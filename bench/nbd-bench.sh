#!/usr/bin/env bash
# strata-nbd against qemu-nbd serving the same 3-deep qcow2 chain on a unix
# socket and on 127.0.0.1, with nbdkit's file plugin on the flattened raw
# image as a ceiling.
# fio (ioengine=nbd): 4 KiB randread and randwrite at iodepth 32 with 1 and
# 2 jobs (one connection each), 1 MiB sequential read; then nbdcopy of the
# whole export to null:.  Prints IOPS, MiB/s and p99 latency per server and
# strata's ratio to qemu-nbd.
#   bench/nbd-bench.sh [BUILD_DIR] [SECONDS_PER_JOB] [SIZE]
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
secs=${2:-5}
size=${3:-1G}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# The chain: every layer holds a third of the data, written with qemu-io.
qemu-img create -q -f qcow2 base.qcow2 "$size"
qemu-io -f qcow2 -c "write -P 1 0 $((${size%G} * 1024 / 3))M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-io -f qcow2 -c "write -P 2 $((${size%G} * 1024 / 3))M $((${size%G} * 1024 / 3))M" \
  mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c "write -P 3 $((${size%G} * 2048 / 3))M $((${size%G} * 1024 / 3))M" \
  top.qcow2 >/dev/null
qemu-img convert -O raw top.qcow2 flat.raw

free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME TRANSPORT: a fresh writable copy of the top layer, served on
# NAME.sock (unix) or on 127.0.0.1:$port (tcp); sets $uri.
start() {
  local name=$1 tr=$2 sock=$work/$1.sock
  local -a where
  rm -f "$sock"
  if [[ $tr == unix ]]; then
    uri="nbd+unix:///?socket=$sock"
    case $name in nbdkit) where=(-U "$sock") ;; *) where=(-k "$sock") ;; esac
  else
    port=$(free_port)
    uri="nbd://127.0.0.1:$port/"
    case $name in
      nbdkit) where=(-i 127.0.0.1 -p "$port") ;;
      *) where=(-b 127.0.0.1 -p "$port") ;;
    esac
  fi
  case $name in
    strata)
      cp --sparse=always top.qcow2 top-strata.qcow2
      "$build/strata-nbd" -f qcow2 "${where[@]}" -t -e 4 top-strata.qcow2 &
      ;;
    qemu)
      cp --sparse=always top.qcow2 top-qemu.qcow2
      qemu-nbd -f qcow2 "${where[@]}" -t -e 4 top-qemu.qcow2 &
      ;;
    nbdkit)
      cp --sparse=always flat.raw flat-nbdkit.raw
      nbdkit -f "${where[@]}" file file=flat-nbdkit.raw &
      ;;
  esac
  pids+=($!)
  for _ in $(seq 100); do
    nbdinfo --size "$uri" >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "$name did not start" >&2
  exit 1
}

stop() {
  local p=${pids[-1]}
  kill "$p"
  wait "$p" 2>/dev/null || true
  unset 'pids[-1]'
}

fiojob() {  # RW BS JOBS -> "iops mibs p99_us" against $uri
  fio --name=b --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" \
    --numjobs="$3" --iodepth=32 --time_based --runtime="$secs" \
    --size="$size" --group_reporting --output-format=json 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
p99 = d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
iops, bw = d["iops"], d["bw_bytes"] / 2**20
print(f"{iops:.0f} {bw:.1f} {p99:.0f}")'
}

tests=("randread 4k 1" "randread 4k 2" "randwrite 4k 1" "randwrite 4k 2"
       "read 1M 1")
declare -A res
for tr in unix tcp; do
  for srv in strata qemu nbdkit; do
    start $srv $tr
    for t in "${tests[@]}"; do
      set -- $t
      res[$srv,$tr,$t]=$(fiojob "$1" "$2" "$3")
    done
    s0=$(date +%s.%N)
    nbdcopy "$uri" null:
    s1=$(date +%s.%N)
    res[$srv,$tr,nbdcopy]=$(/usr/bin/python3 -c "
mib = $(stat -c %s flat.raw) / 2**20
print(f'- {mib / ($s1 - $s0):.1f} -')")
    stop
  done
done

printf '%-22s %-8s %10s %10s %10s\n' test server IOPS MiB/s p99_us
for tr in unix tcp; do
  for t in "${tests[@]}" nbdcopy; do
    for srv in strata qemu nbdkit; do
      read -r iops mibs p99 <<<"${res[$srv,$tr,$t]}"
      printf '%-22s %-8s %10s %10s %10s\n' "$tr-${t// /-}" "$srv" "$iops" "$mibs" "$p99"
    done
    read -r si sm _ <<<"${res[strata,$tr,$t]}"
    read -r qi qm _ <<<"${res[qemu,$tr,$t]}"
    /usr/bin/python3 -c "
si, sm, qi, qm = '$si', float('$sm'), '$qi', float('$qm')
r = (float(si) / float(qi)) if si != '-' and float(qi) else sm / qm
print(\"%-22s %-8s %10.2f  (strata / qemu-nbd)\" % (\"\", \"ratio\", r))"
  done
done
