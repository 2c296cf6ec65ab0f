#!/usr/bin/env bash
# Stop what slurm-up.sh started, by recorded PID only (never by name).
BASE=${BASE:-/tmp/p3s-slurm}
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null); [ -n "$s" ] && [ "${s:0:1}" != Z ]; }  # a zombie is gone
stop() {  # TERM the PIDs in the given pidfiles, wait up to 10 s, then KILL
  local pids=() f p i
  for f in "$@"; do [ -f "$f" ] && pids+=("$(cat "$f")") && rm -f "$f"; done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null
  for i in $(seq 100); do
    for p in "${pids[@]}"; do alive "$p" && { sleep 0.1; continue 2; }; done; return 0
  done
  kill -KILL "${pids[@]}" 2>/dev/null; return 0
}
# The nodes first, while their controller still answers: a slurmd told TERM together with its
# slurmctld waited out the 10 s for it and was killed, 10 s of every test's teardown. (It also
# ignores TERM while munge is unreachable: the KILL fallback.)
stop "$BASE"/slurmd-*.pid
stop "$BASE/slurmctld.pid"
stop "$BASE/munged.pid"
# Job step daemons (slurmstepd) outlive slurmd, reparented to init: ours are those holding a file
# under $BASE open (their node's log), whatever their name says.
for proc in /proc/[0-9]*; do
  for fd in "$proc"/fd/*; do
    case "$(readlink "$fd" 2>/dev/null)" in
      "$BASE"/*) kill -KILL "${proc#/proc/}" 2>/dev/null; break ;;
    esac
  done
done
exit 0
