#!/usr/bin/env bash
# pgen.sh N [pilot.py options...]: start N pilots on this node, detached, each with its own log.
#
#   ./pgen.sh 4 -s mysite --jobtype dqm
#   ./pgen.sh 4 '-s mysite --jobtype dqm'      # the original's form: one quoted argument
#   pdsh -w 'node[1-8]' /path/to/p3s/pgen.sh 4 -s mysite
#
# Each pilot runs under setsid with stdin, stdout and stderr redirected (so pdsh returns at once);
# its pid (with its start time and this clone's path, see pilot-pids.sh) goes to
# $P3S_RUNDIR/pilot-<stamp>.pid and its output to pilot-<stamp>.log beside it.
#   P3S_NODE    this node's name, registered by the pilots (default: hostname -s)
#   P3S_RUNDIR  pid and log directory (default: ~/.p3s/run/$P3S_NODE)
#   P3S_PYTHON  the Python to run pilot.py with (default: python3)
#   P3S_LOG_DAYS  days a pilot's log is kept once the pilot has ended (default 2)
# Each run also tidies the run directory: the pid files of pilots that ended go, their logs once
# older than P3S_LOG_DAYS (a live pilot's log is never touched: it is written as it runs).
# Pilots reach the server through P3S_SERVER and P3S_TOKEN/P3S_TOKEN_FILE as usual.
set -eu
usage() { echo "usage: pgen.sh N [pilot.py options...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in ''|*[!0-9]*) echo "pgen.sh: N must be a whole number, got '$1'" >&2; exit 2;; esac
n=$1; shift
if [ $# -eq 1 ] && [[ $1 == *[[:space:]]* ]]; then
  # The original's form, all pilot options in one quoted argument ('-s np04 -c 0 -p 40'): split
  # it as a shell would (quotes respected), never eval'd, so it cannot inject a command.
  words=$("${P3S_PYTHON:-python3}" -c '
import shlex, sys
try:
    print("\n".join(shlex.split(sys.argv[1])))
except ValueError as e:
    sys.exit(f"pgen.sh: cannot split the pilot options {sys.argv[1]!r}: {e}")' "$1") || exit 2
  mapfile -t split <<<"$words"
  set -- "${split[@]}"
fi
here=$(cd "$(dirname "$0")" && pwd)
. "$here/pilot-pids.sh"
export P3S_NODE=${P3S_NODE:-$(hostname -s)}
rundir=${P3S_RUNDIR:-$HOME/.p3s/run/$P3S_NODE}
mkdir -p "$rundir"
for f in "$rundir"/pilot-*.pid; do
  [ -e "$f" ] || continue
  pilot_pid "$f" >/dev/null || rm -f "$f"
done
find "$rundir" -maxdepth 1 -name 'pilot-*.log' -mmin +$(( ${P3S_LOG_DAYS:-2} * 1440 )) -delete
# refuse at once what every pilot would refuse alone in its log (a bad option, an undefined site)
"${P3S_PYTHON:-python3}" "$here/pilot.py" --check "$@" >/dev/null || exit 2
for i in $(seq "$n"); do
  stamp=$(date +%Y%m%d-%H%M%S)-$$-$i
  # In a non-interactive shell setsid execs in place, so $! is the pilot's own pid.
  setsid "${P3S_PYTHON:-python3}" "$here/pilot.py" "$@" </dev/null >"$rundir/pilot-$stamp.log" 2>&1 &
  record_pilot $! "$rundir/pilot-$stamp.pid" "$here"
done
echo "$P3S_NODE: started $n pilot(s), pid files in $rundir"
