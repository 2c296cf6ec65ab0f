# Sourced by preport.sh and pkill.sh: is the pilot recorded in a pid file still alive?
# Alive means: the pid exists, is not a zombie (nothing may reap it soon), and is still a
# pilot.py (the pid was not reused by something else after the pilot ended).
pilot_alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$stat" ] && [ "${stat:0:1}" != Z ] || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'pilot\.py' || [ ! -d /proc ]
}
