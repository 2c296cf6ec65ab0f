#!/usr/bin/env bash
# Throw-away Slurm 22.05 on loopback: munged + slurmctld + 1 slurmd per fake node. No systemd, no /etc edits.
# Needs (root): apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# Env: BASE (state dir), NODES (0 = one node named $(hostname -s); N = fake nodes node1..N),
#      NCPU (CPUs per node, may exceed real cores), AUTH (munge|none), CTLPORT, DPORT0.
set -euo pipefail
BASE=${BASE:-/tmp/p3s-slurm}; NODES=${NODES:-0}; NCPU=${NCPU:-4}; AUTH=${AUTH:-munge}
CTLPORT=${CTLPORT:-6817}; DPORT0=${DPORT0:-17001}
mkdir -p "$BASE"/{state,spool,log,munge}; chmod 755 "$BASE" "$BASE/munge"  # munged wants o+x on its socket's dirs
if [ "$NODES" = 0 ]; then NAMES=$(hostname -s); NODELINE="NodeName=$NAMES NodeAddr=127.0.0.1 Port=$DPORT0"
else NAMES=$(seq -f node%g 1 "$NODES"); NODELINE="NodeName=node[1-$NODES] NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$DPORT0-$((DPORT0+NODES-1))"; fi
if [ "$AUTH" = munge ]; then
  [ -f "$BASE/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$BASE/munge/munge.key"; chmod 400 "$BASE/munge/munge.key"; }
  /usr/sbin/munged -F --key-file="$BASE/munge/munge.key" --socket="$BASE/munge/munge.sock" --pid-file="$BASE/munge/munged.pid" \
    --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/seed" >>"$BASE/log/munged.out" 2>&1 &
  echo $! > "$BASE/munged.pid"
  AUTHCONF="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.sock"
  for i in $(seq 50); do [ -S "$BASE/munge/munge.sock" ] && break; sleep 0.1; done
  [ -S "$BASE/munge/munge.sock" ] || { echo "munged failed: $(tail -n 2 "$BASE/log/munged.out")" >&2; exit 1; }
else AUTHCONF="AuthType=auth/none
CredType=cred/none"; fi
cat > "$BASE/slurm.conf" <<CONF
ClusterName=p3stest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLPORT
$AUTHCONF
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/slurmctld.pidfile
SlurmdPidFile=$BASE/slurmd-%n.pidfile
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=${SCHEDPARAMS:-batch_sched_delay=0,sched_min_interval=0}
$NODELINE CPUs=$NCPU State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$BASE/slurm.conf"
/usr/sbin/slurmctld -D -f "$SLURM_CONF" >>"$BASE/log/slurmctld.out" 2>&1 &
echo $! > "$BASE/slurmctld.pid"
for n in $NAMES; do
  /usr/sbin/slurmd -D -f "$SLURM_CONF" -N "$n" >>"$BASE/log/slurmd-$n.out" 2>&1 &
  echo $! > "$BASE/slurmd-$n.pid"
done
want=$(echo $NAMES | wc -w)
for i in $(seq 300); do   # ready = every node idle
  [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" = "$want" ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "slurm not ready; see $BASE/log" >&2; exit 1
