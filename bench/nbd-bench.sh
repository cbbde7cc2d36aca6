#!/usr/bin/env bash
# strata-nbd against qemu-nbd serving the same 3-deep qcow2 chain, and
# nbdkit's file plugin serving that chain flattened to raw (the ceiling),
# on a unix socket and on 127.0.0.1, on tmpfs and on disk (bench_roots).
#
#   bench/nbd-bench.sh [BUILD_DIR] [SECONDS_PER_JOB] [SIZE]
#
# Chains (both base <- mid <- top):
#   thirds      SIZE (default 1G): each layer holds a third of the data,
#               in one piece
#   fragmented  FRAG_SIZE (default 4G): bench/fixture.sh's real shape,
#               base fully written, mid and top 10 % each in scattered
#               64 KiB clusters
# SHAPES="thirds fragmented" picks the chains, BENCH_ROOT one root.
#
# Each test gets a fresh server on a fresh writable copy of top.qcow2 (so
# a write test always starts from the same image; nbdkit writes its raw
# file in place, which is fully allocated): fio (ioengine=nbd) 4 KiB
# randread and randwrite at iodepth 32 with 1 and 2 jobs (one connection
# each), 1 MiB sequential read, a mixed load (randrw, 4 KiB/64 KiB/1 MiB,
# 2 jobs), then nbdcopy of the whole export to null:.  Per row: IOPS
# (MiB/s for the 1 MiB, mixed and nbdcopy rows) of each server, strata's
# ratio to qemu-nbd and to nbdkit (above 1: strata is faster), each
# server's peak RSS (VmHWM) in MiB after that test, and for the fio rows
# the CPU time (user and system, all threads, microseconds) each server
# spent per request while the test ran: a server with fewer IOPS but
# less CPU per request was waiting, not working.  The servers take turns at going
# first (strata, then qemu-nbd, from one test to the next; nbdkit last),
# so that neither always inherits the page cache and freed memory of the
# same predecessor.  Not a test: noisy on a shared machine, so compare
# ratios from one run.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
secs=${2:-5}
size=${3:-1G}
frag_size=${FRAG_SIZE:-4G}
shapes=${SHAPES:-thirds fragmented}
. "$top/bench/fixture.sh"
[[ -x $build/strata-nbd ]] || { echo "nbd-bench: $build/strata-nbd not built" >&2; exit 1; }

work=
pid=
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  [[ -n $work ]] && rm -rf "$work"
}
trap cleanup EXIT

# thirds_chain DIR SIZE: every layer holds a third of the data, written
# with qemu-io.
thirds_chain() {
  local d=$1 mib=$(($(numfmt --from=iec "$2") / 1048576))
  local third=$((mib / 3))
  qemu-img create -q -f qcow2 "$d/base.qcow2" "$2"
  qemu-io -f qcow2 -c "write -P 1 0 ${third}M" "$d/base.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/mid.qcow2"
  qemu-io -f qcow2 -c "write -P 2 ${third}M ${third}M" "$d/mid.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$d/top.qcow2"
  qemu-io -f qcow2 -c "write -P 3 $((2 * third))M ${third}M" "$d/top.qcow2" \
    >/dev/null
}

free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME TRANSPORT: NAME's server on a fresh writable copy of the top
# layer (the raw file for nbdkit), on $work/NAME.sock (unix) or on
# 127.0.0.1:$port (tcp); sets $uri and $pid.
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
      cp --sparse=always "$work/top.qcow2" "$work/serve.qcow2"
      "$build/strata-nbd" -f qcow2 "${where[@]}" -t -e 4 "$work/serve.qcow2" &
      ;;
    qemu)
      cp --sparse=always "$work/top.qcow2" "$work/serve.qcow2"
      qemu-nbd -f qcow2 "${where[@]}" -t -e 4 "$work/serve.qcow2" &
      ;;
    nbdkit)
      nbdkit -f "${where[@]}" file file="$work/flat.raw" &
      ;;
  esac
  pid=$!
  for _ in $(seq 200); do
    if nbdinfo --size "$uri" >/dev/null 2>&1; then
      cpu0=$(cpu_us)
      return
    fi
    sleep 0.05
  done
  echo "$name did not start" >&2
  exit 1
}

# cpu_us: the CPU time of the server so far, all its threads (live and
# exited), in microseconds.
cpu_us() {
  awk -v hz="$(getconf CLK_TCK)" '{
      sub(/^.*\) /, "")   # the fields after "(comm) "; utime, stime: 12, 13
      printf "%.0f\n", ($12 + $13) * 1e6 / hz }' "/proc/$pid/stat"
}

# stop OPS: "rss_mib cpu_us_per_request" on stdout (the second "-" when
# OPS is "-"); the server and its copy go.
stop() {
  local ops=$1
  awk -v ops="$ops" -v du=$(($(cpu_us) - cpu0)) '/^VmHWM:/ {
      if (ops == "-" || ops == 0) printf "%.0f -\n", $2 / 1024
      else printf "%.0f %.1f\n", $2 / 1024, du / ops }' "/proc/$pid/status"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
  rm -f "$work/serve.qcow2"
}

fiojob() { # RW BS JOBS [fio options] -> "iops mibs" against $uri
  local rw=$1 bs=$2 jobs=$3
  shift 3
  fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
    --numjobs="$jobs" --iodepth=32 --time_based --runtime="$secs" \
    --size="$bytes" --group_reporting --output-format=json "$@" 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 2**20
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
print(f"{iops:.0f} {bw:.1f} {ios}")'
}

run_test() { # TEST -> "figure_of_merit requests" against $uri
  local s0 s1
  case $1 in
    randread-4k-1) fiojob randread 4k 1 | cut -d' ' -f1,3 ;;
    randread-4k-2) fiojob randread 4k 2 | cut -d' ' -f1,3 ;;
    randwrite-4k-1) fiojob randwrite 4k 1 | cut -d' ' -f1,3 ;;
    randwrite-4k-2) fiojob randwrite 4k 2 | cut -d' ' -f1,3 ;;
    read-1M-1) fiojob read 1M 1 | cut -d' ' -f2,3 ;;
    mixed-2)
      fiojob randrw 4k 2 --bssplit=4k/60:64k/30:1m/10 | cut -d' ' -f2,3 ;;
    nbdcopy)
      s0=$(date +%s%N)
      nbdcopy "$uri" null:
      s1=$(date +%s%N)
      echo "$bytes $s0 $s1" | awk '{ printf "%.1f -\n", $1 / 1048576 / (($3 - $2) / 1e9) }'
      ;;
  esac
}

tests=(${TESTS:-randread-4k-1 randread-4k-2 randwrite-4k-1 randwrite-4k-2 read-1M-1
       mixed-2 nbdcopy})
rows=()
turn=0
for root in $(bench_roots); do
  for shape in $shapes; do
    work=$(mktemp -d "$root/strata-nbd-bench.XXXXXX")
    if [[ $shape == thirds ]]; then
      thirds_chain "$work" "$size"
    else
      make_fixture "$work" "$shape" "$frag_size"
    fi
    qemu-img convert -O raw "$work/top.qcow2" "$work/flat.raw"
    bytes=$(stat -c %s "$work/flat.raw")
    for tr in unix tcp; do
      for t in "${tests[@]}"; do
        declare -A val=() rss=() cpu=()
        if ((turn++ % 2 == 0)); then order="strata qemu nbdkit"
        else order="qemu strata nbdkit"; fi
        for srv in $order; do
          start "$srv" "$tr"
          read -r v ops <<<"$(run_test "$t")"
          val[$srv]=$v
          read -r rss[$srv] cpu[$srv] <<<"$(stop "$ops")"
        done
        rows+=("$root $shape $tr $t ${val[strata]} ${val[qemu]} ${val[nbdkit]} ${rss[strata]} ${rss[qemu]} ${rss[nbdkit]} ${cpu[strata]} ${cpu[qemu]} ${cpu[nbdkit]}")
        printf '.' >&2
      done
    done
    rm -rf "$work"
    work=
  done
done
echo >&2

printf '%-9s %-10s %-4s %-14s %9s %9s %9s %5s %5s  %-13s %s\n' root chain \
  tr test strata qemu-nbd nbdkit s/q s/k "RSS MiB s/q/k" "CPU us/req s/q/k"
for row in "${rows[@]}"; do
  set -- $row
  unit=IOPS
  [[ $4 == randread* || $4 == randwrite* ]] || unit=MiB/s
  awk -v r="$1" -v c="$2" -v tr="$3" -v t="$4" -v s="$5" -v q="$6" -v k="$7" \
    -v rs="$8" -v rq="$9" -v rk="${10}" -v cs="${11}" -v cq="${12}" \
    -v ck="${13}" -v u="$unit" 'BEGIN {
      printf "%-9s %-10s %-4s %-14s %9s %9s %9s %5.2f %5.2f  %-13s %-17s %s\n",
        r, c, tr, t, s, q, k, (q > 0 ? s / q : 0), (k > 0 ? s / k : 0),
        rs "/" rq "/" rk, cs "/" cq "/" ck,
        (u == "IOPS" ? "" : "(MiB/s)") }'
done
