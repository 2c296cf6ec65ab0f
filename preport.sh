#!/usr/bin/env bash
# preport.sh [-v]: this node's live pilots, from the pid files pgen.sh wrote, each checked against
# the live process table (a zombie or a reused pid does not count). Never matches process names.
#
#   host=node1 live=2 stale=0
#   host=node1 pid=4242 uuid=0b7c...  age=315 log=/home/u/.p3s/run/node1/pilot-....log   (with -v)
#
# stale counts pid files whose pilot is gone (pkill.sh removes them). Same P3S_NODE/P3S_RUNDIR as pgen.sh.
set -u
verbose=0
case ${1:-} in -v) verbose=1;; '') ;; *) echo "usage: preport.sh [-v]" >&2; exit 2;; esac
node=${P3S_NODE:-$(hostname -s)}
rundir=${P3S_RUNDIR:-$HOME/.p3s/run/$node}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/pilot-pids.sh"
live=0; stale=0; lines=()
for pidfile in "$rundir"/pilot-*.pid; do
  [ -e "$pidfile" ] || continue
  if pid=$(pilot_pid "$pidfile"); then
    live=$((live + 1))
    log=${pidfile%.pid}.log
    uuid=$(grep -m1 -o 'registered as [0-9a-f-]*' "$log" 2>/dev/null | cut -d' ' -f3)
    lines+=("host=$node pid=$pid uuid=${uuid:--} age=$(ps -o etimes= -p "$pid" | tr -d ' ') log=$log")
  else
    stale=$((stale + 1))
  fi
done
echo "host=$node live=$live stale=$stale"
if [ $verbose = 1 ] && [ ${#lines[@]} -gt 0 ]; then printf '%s\n' "${lines[@]}"; fi
exit 0
