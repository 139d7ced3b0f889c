#!/usr/bin/env bash
# `make bench` as README gives it, from a fresh copy of the tracked files, on a machine whose calls end sooner than
# the whole bench runs (the device tool's are 10 minutes; make bench takes about 12 on an H200).
#   bash benchmarks/make_bench_detached.sh start [seconds]   copies the tracked files to $FRESH, starts make bench
#                                                            there in a session of its own, waits up to [seconds]
#   bash benchmarks/make_bench_detached.sh wait [seconds]    waits again, up to [seconds]
# Either returns as soon as make bench ends: exit 0 when it passed, 1 when it failed, 3 while it still runs, 2 when
# there is nothing to wait for (or start finds a run still going). Its log is $FRESH/make-bench.log; where $OUT is
# set, the results and the log are archived there as make-bench.tgz.
# The copy is of the files here that git does not ignore and that exist (what a clone of this checkout holds): the
# GPU machine gets this working tree, but its .git, and so its index, may be an older commit's.
set -uo pipefail
cd "$(dirname "$0")/.."
FRESH=${FRESH:-/tmp/graphrunner-fresh}
log=$FRESH/make-bench.log
what=${1:-}
limit=${2:-540}
running() { [ -f "$log" ] && ! grep -q "^make bench exit" "$log"; }
if [ "$what" = start ]; then
  if running; then
    echo "make bench still runs in $FRESH: wait for it" >&2
    exit 2
  fi
  rm -rf "$FRESH" && mkdir -p "$FRESH"
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
    tar cf - --null -T - | tar xf - -C "$FRESH"
  # setsid: the device tool ends a call's processes when it returns, except those in a session of their own
  (cd "$FRESH" && setsid bash -c 'make bench > make-bench.log 2>&1; echo "make bench exit $?" >> make-bench.log' \
    < /dev/null > /dev/null 2>&1 &)
elif [ "$what" != wait ]; then
  echo "usage: $0 start|wait [seconds]" >&2
  exit 2
elif [ ! -f "$log" ]; then
  echo "no make bench to wait for in $FRESH: start one" >&2
  exit 2
fi
end=$((SECONDS + limit))
while [ "$SECONDS" -lt "$end" ] && ! grep -q "^make bench exit" "$log" 2>/dev/null; do sleep 5; done
grep -vE "DEBUG|^\s*$" "$log" | grep -E "^(NVIDIA|targets|  [A-Za-z_0-9]+ +[0-9.]+ +(>=|<=)|make|Traceback|\S+Error)" \
  | tail -80
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/make-bench.tgz" -C "$FRESH" benchmarks/results make-bench.log
fi
if ! grep -q "^make bench exit" "$log"; then
  echo "make bench still runs (log: $log)"
  exit 3
fi
grep -q "^make bench exit 0" "$log"
