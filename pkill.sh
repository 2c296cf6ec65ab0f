#!/usr/bin/env bash
# pkill.sh [-g] [-t GRACE]: stop this node's pilots, found through pgen.sh's pid files.
#   default  SIGTERM: each pilot stops its payload, reports the job (pilotTO, retried if attempts
#            remain) and deregisters; pilots still alive after GRACE seconds (default 20) get SIGKILL.
#   -g       graceful drain (SIGUSR1): each pilot finishes its current job, then exits; returns at once.
# Pid files of pilots that are gone are removed. Same P3S_NODE/P3S_RUNDIR as pgen.sh.
set -u
signal=TERM; grace=20
while getopts "gt:" opt; do
  case $opt in
    g) signal=USR1;;
    t) case $OPTARG in ''|*[!0-9]*) echo "pkill.sh: -t takes whole seconds" >&2; exit 2;; esac; grace=$OPTARG;;
    *) echo "usage: pkill.sh [-g] [-t GRACE]" >&2; exit 2;;
  esac
done
node=${P3S_NODE:-$(hostname -s)}
rundir=${P3S_RUNDIR:-$HOME/.p3s/run/$node}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/pilot-pids.sh"
pidfiles=(); pids=()
for pidfile in "$rundir"/pilot-*.pid; do
  [ -e "$pidfile" ] || continue
  if pid=$(pilot_pid "$pidfile"); then
    kill -s "$signal" "$pid" 2>/dev/null && pidfiles+=("$pidfile") && pids+=("$pid")
  else
    rm -f "$pidfile"
  fi
done
if [ $signal = USR1 ]; then echo "$node: asked ${#pids[@]} pilot(s) to drain"; exit 0; fi
alive_left() { local f; for f in "${pidfiles[@]}"; do pilot_pid "$f" >/dev/null && return 0; done; return 1; }
for _ in $(seq $((grace * 10))); do alive_left || break; sleep 0.1; done
killed=0
for f in "${pidfiles[@]}"; do
  pid=$(pilot_pid "$f") && kill -s KILL "$pid" 2>/dev/null && killed=$((killed + 1))
done
sleep 0.2
for pidfile in "$rundir"/pilot-*.pid; do
  [ -e "$pidfile" ] && ! pilot_pid "$pidfile" >/dev/null && rm -f "$pidfile"
done
echo "$node: stopped ${#pids[@]} pilot(s) ($killed needed SIGKILL)"
exit 0
