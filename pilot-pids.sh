# Sourced by pgen.sh, preport.sh and pkill.sh. A pid file holds "PID STARTTIME CLONE": the
# pilot's pid, its start time (field 22 of /proc/PID/stat, in clock ticks since boot) and the
# directory of the pilot.py it runs. A pid is that pilot only if all three still match, so a
# stale pid file never names another process: a reused pid, another clone's pilot, `less
# pilot.py` or copilot.py.
start_time() {
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20
}

# pilot_pid PIDFILE: print the pid if the pilot it recorded is still alive (not a zombie).
pilot_pid() {
  local pid start clone stat
  read -r pid start clone <"$1" 2>/dev/null
  case $pid in ''|*[!0-9]*) return 1;; esac
  stat=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [ -n "$stat" ] && [ "${stat:0:1}" != Z ] || return 1
  [ -n "$start" ] && [ "$(start_time "$pid")" = "$start" ] || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$clone/pilot.py" || return 1
  echo "$pid"
}

# record_pilot PID PIDFILE CLONE: write the pid file of a pilot just started.
record_pilot() {
  echo "$1 $(start_time "$1") $3" >"$2"
}
