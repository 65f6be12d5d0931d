#!/usr/bin/env bash
# A throw-away one-node Slurm cluster for the tests: `slurm_cluster.sh up DIR` installs the Debian
# packages if missing (needs root), writes a minimal configuration into DIR and starts munged,
# MariaDB, slurmdbd, slurmctld and slurmd there as plain daemons (no systemd, no cgroups);
# `slurm_cluster.sh down DIR` stops them. Nothing is written outside DIR (bar the packages): clients
# find the cluster through SLURM_CONF=DIR/slurm.conf, which `up` prints as its last line.
#
# Why each unusual setting:
#   proctrack/linuxproc, task/none   process tracking without cgroups (containers have none to give)
#   slurmdbd + MariaDB               without accounting `sacct` fails and submitit never learns that a
#                                    job was killed or cancelled (its result() then waits forever)
#   AuthInfo cred_expire=10          a requeued job waits cred_expire before it restarts (default 120 s)
#   sched_interval=2, bf_interval=1  pending (e.g. requeued) jobs start at the next scheduler pass
#   own ports, own munge socket      never collides with a real Slurm or munge on the same machine
set -euo pipefail

PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-16818}
DBD_PORT=${SLURM_TEST_DBD_PORT:-16819}
DB_PORT=${SLURM_TEST_DB_PORT:-16306}
DB_PASS=slurm-test

exec 3>&2  # the script's stderr, for messages from checks whose own output wait_for discards;
           # every daemon starts with fd 3 closed, or it would hold the caller's pipe open
log() { echo "slurm_cluster: $*" >&3; }
die() { log "error: $*"; exit 1; }

install_packages() {
  # Only what is missing; apt-get needs root.
  local missing=()
  for bin in slurmctld slurmd slurmdbd munged mariadbd sbatch sacct; do
    command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]} and not root: apt-get install ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$DIR/apt.log" 2>&1 || {
    apt-get update -qq >>"$DIR/apt.log" 2>&1
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1
  } || die "apt-get install failed: see $DIR/apt.log"
}

wait_for() {
  # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s.
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not come up within ${seconds}s (logs in $DIR/log)"
    sleep 0.2
  done
}

write_configs() {
  # One node: this host with its real CPU count and memory, reached at 127.0.0.1 (the host name need
  # not resolve).
  local node cpus mem
  node=$(hostname -s)
  cpus=$(nproc --all)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=paperrepro
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
MessageTimeout=5
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge.socket
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
  mungekey --create --keyfile="$DIR/munge.key" --force >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$DIR/munge.key" bs=1 count=1024 status=none
  chmod 600 "$DIR/munge.key"
  munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed" 3>&-
  wait_for 10 munged test -S "$DIR/munge.socket"
}

mariadb_answers() {
  # Stop waiting at once when the server has exited (e.g. its port was taken).
  kill -0 "$DB_PID" 2>/dev/null || die "MariaDB exited: see $DIR/log/mariadb.log"
  mariadb --no-defaults -S "$DIR/mysql.sock" -u root -e "SELECT 1"
}

start_mariadb() {
  # A private MariaDB on 127.0.0.1:$DB_PORT, only for slurmdbd.
  mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal \
    --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: see $DIR/log/mariadb-install.log"
  mariadbd --no-defaults --datadir="$DIR/mysql" --user=root --socket="$DIR/mysql.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --pid-file="$DIR/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
    --innodb-buffer-pool-size=64M --skip-log-bin >/dev/null 2>&1 3>&- &
  DB_PID=$!
  wait_for 30 MariaDB mariadb_answers
  mariadb --no-defaults -S "$DIR/mysql.sock" -u root -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
  export SLURM_CONF="$DIR/slurm.conf"
  slurmdbd 3>&-
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster paperrepro >/dev/null 2>&1 || true
  slurmctld -f "$SLURM_CONF" 3>&-
  wait_for 30 slurmctld scontrol ping
  slurmd -f "$SLURM_CONF" 3>&-
  wait_for 30 "the node (idle)" bash -c "sinfo -h -N -o %t | grep -qx idle"
}

up() {
  [ -e "$DIR/slurm.conf" ] && { log "a cluster is configured in $DIR already: stopping it first"; down; }
  case "$DIR" in /|/tmp|/root|/home) die "refusing to use $DIR as the cluster folder";; esac
  rm -rf "$DIR"
  mkdir -p "$DIR"/{state,spool,log}
  chmod 700 "$DIR"
  PATH="$PATH:/usr/sbin:/sbin"
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurm
  log "cluster up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
  echo "SLURM_CONF=$DIR/slurm.conf"
}

stop_daemons() {
  # TERM the daemons named (pid files in DIR) together, then KILL what still runs after 10 s.
  local pids=() pid name
  for name in "$@"; do
    pid=$(cat "$DIR/$name.pid" 2>/dev/null) || continue
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null && pids+=("$pid"); fi
    rm -f "$DIR/$name.pid"
  done
  pid=
  for _ in $(seq 50); do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break 1; pid=; done
    [ -z "${pid:-}" ] && return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

down() {
  export SLURM_CONF="$DIR/slurm.conf"
  PATH="$PATH:/usr/sbin:/sbin"
  [ -f "$DIR/slurmctld.pid" ] && scancel --full -u "$(id -un)" >/dev/null 2>&1 || true
  stop_daemons slurmd slurmctld         # they report to slurmdbd, which needs MariaDB and munge
  stop_daemons slurmdbd mariadb munged
}

case "${1:-}" in
  up|down) DIR=$(realpath -m "${2:?usage: $0 up|down DIR}"); "$1" ;;
  *) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
esac
