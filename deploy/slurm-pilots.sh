#!/usr/bin/env bash
# A Slurm job array of p3s pilots: one pilot per array task. Submit from anywhere:
#
#   sbatch --array=1-50 --export=ALL,P3S_HOME=/afs/.../p3s,P3S_SERVER=http://p3s.example:8000 \
#          deploy/slurm-pilots.sh
#
# Variables a site sets (environment, or edit the defaults below):
#   P3S_HOME         the p3s clone on the shared file system (required)
#   P3S_SERVER       the server URL (required)
#   P3S_TOKEN_FILE   the token file readable on the nodes (default: $P3S_HOME/p3s.token)
#   P3S_SITE         site name given to the pilots (default: none)
#   P3S_MAX_IDLE     seconds a pilot waits without work before it ends its task (default 300)
#   P3S_PILOT_ARGS   any other pilot.py options, e.g. "--jobtype dqm -b 30"
#   P3S_PYTHON       Python 3.9+ on the nodes (default python3)
#   P3S_RUNDIR       where each pilot's output goes, as pilot-slurm-<job>_<task>.log (default
#                    ~/.p3s/run/<node>, as pgen.sh's); logs older than P3S_LOG_DAYS (2) are removed
#                    as each task starts, so nothing piles up in the clone or the submit directory
# The pilot's -e carries the Slurm ids (slurm:<array job>_<task>), shown on the status pages.
# scancel sends SIGTERM: the pilot stops its payload, reports the job and deregisters.
#SBATCH --job-name=p3s-pilot
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=/dev/null
set -eu
export P3S_NODE=${SLURMD_NODENAME:-$(hostname -s)}
rundir=${P3S_RUNDIR:-$HOME/.p3s/run/$P3S_NODE}
mkdir -p "$rundir"
find "$rundir" -maxdepth 1 -name 'pilot-*.log' -mmin +$(( ${P3S_LOG_DAYS:-2} * 1440 )) -delete
exec >"$rundir/pilot-slurm-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}.log" 2>&1
: "${P3S_HOME:?set P3S_HOME to the p3s clone}" "${P3S_SERVER:?set P3S_SERVER to the server URL}"
export P3S_SERVER P3S_TOKEN_FILE=${P3S_TOKEN_FILE:-$P3S_HOME/p3s.token}
site_args=()
[ -n "${P3S_SITE:-}" ] && site_args=(-s "$P3S_SITE")
# exec: the pilot itself receives scancel's signals
# shellcheck disable=SC2086
exec "${P3S_PYTHON:-python3}" "$P3S_HOME/pilot.py" "${site_args[@]}" \
  -e "slurm:${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}" \
  --max-idle "${P3S_MAX_IDLE:-300}" ${P3S_PILOT_ARGS:-}
