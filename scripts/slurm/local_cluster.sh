#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying the SLURM path without a cluster.
#
#   scripts/slurm/local_cluster.sh install   # apt-get the Debian packages (slurm-wlm, munge, slurmdbd, mariadb)
#   scripts/slurm/local_cluster.sh up        # start munged, MariaDB, slurmdbd, slurmctld, slurmd (as root)
#   scripts/slurm/local_cluster.sh down      # stop them all, by the PIDs recorded at `up`
#   scripts/slurm/local_cluster.sh status
#
# Daemons run as plain processes (no systemd): NodeName=localhost with this machine's CPUs and memory,
# proctrack/linuxproc, task/none, cons_tres on cores (jobs share the node), accounting through slurmdbd into
# MariaDB: without an accounting database, submitit cannot tell that a job crashed or was cancelled.
# Everything it writes lives under $STATE (default /var/tmp/slowmo-slurm) and /etc/slurm/{slurm,slurmdbd}.conf,
# which it writes only if they are absent or were written by this script.
set -euo pipefail

STATE=${SLOWMO_SLURM_STATE:-/var/tmp/slowmo-slurm}
ETC=/etc/slurm
MARK="# written by slowmo scripts/slurm/local_cluster.sh"

die() { echo "local_cluster: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "installing packages needs root (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

write_conf() {  # $1 = file, stdin = content
  if [ -e "$1" ] && ! grep -qF "$MARK" "$1"; then
    die "$1 exists and was not written by this script: not touching a real cluster's configuration"
  fi
  { echo "$MARK"; cat; } > "$1"
}

wait_for() {  # $1 = what, $2... = command that succeeds once it is up
  local what=$1; shift
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within 30 s (logs in $STATE/log)"
}

start() {  # $1 = name; the rest: the daemon's command line (it must stay in the foreground)
  local name=$1; shift
  "$@" >"$STATE/log/$name.out" 2>&1 &
  echo $! > "$STATE/pid/$name"
}

up() {
  [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root"
  install_packages
  if [ -s "$STATE/pid/slurmd" ] && kill -0 "$(cat "$STATE/pid/slurmd")" 2>/dev/null; then
    echo "local cluster already up"; return 0
  fi
  mkdir -p "$STATE"/{log,pid,ctld,slurmd,mysql,mysqlrun,munge} "$ETC"
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

  # munge: authentication between the daemons and the commands
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge "$STATE/munge"
  start munged runuser -u munge -- /usr/sbin/munged --foreground --socket=/run/munge/munge.socket.2 \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
  wait_for munged munge -n

  # MariaDB for slurmdbd, on a socket of its own
  chown mysql:mysql "$STATE/mysql" "$STATE/mysqlrun"
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      >"$STATE/log/mariadb-install.log" 2>&1
  fi
  start mariadbd /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$STATE/mysqlrun/mysqld.sock" \
    --pid-file="$STATE/mysqlrun/mariadbd.pid" --skip-networking=0 --bind-address=127.0.0.1 --port=3307
  wait_for mariadbd mariadb --socket="$STATE/mysqlrun/mysqld.sock" -e "select 1"
  mariadb --socket="$STATE/mysqlrun/mysqld.sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

  write_conf "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"

  write_conf "$ETC/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# a requeued (preempted) job waits cred_expire seconds before it may start again: 120 by default
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

  start slurmdbd /usr/sbin/slurmdbd -D
  wait_for slurmdbd sacctmgr -n show cluster
  sacctmgr -i add cluster local >/dev/null 2>&1 || true
  start slurmctld /usr/sbin/slurmctld -D -i
  wait_for slurmctld scontrol ping
  start slurmd /usr/sbin/slurmd -D -N localhost
  wait_for "slurmd (node idle)" sh -c 'sinfo -h -N -o %t | grep -qE "^(idle|mix|alloc)"'
  echo "local cluster up: partition 'local', node localhost, $cpus CPUs, ${mem} MB (logs: $STATE/log)"
}

down() {
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    local pidfile="$STATE/pid/$name"
    [ -s "$pidfile" ] || continue
    local pid; pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  pkill -f "slurmstepd: \[" 2>/dev/null || true  # steps of jobs still running
  echo "local cluster down"
}

case "${1:-}" in
  install) install_packages ;;
  up) up ;;
  down) down ;;
  status) sinfo && squeue ;;
  *) die "usage: $0 install|up|down|status" ;;
esac
