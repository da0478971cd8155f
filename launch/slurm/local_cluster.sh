#!/usr/bin/env bash
# A real single-node SLURM cluster on 127.0.0.1, for the tests and for trying chains locally.
#
#   launch/slurm/local_cluster.sh start   # install what is missing, start the daemons
#   launch/slurm/local_cluster.sh env     # print `export SLURM_CONF=...` for sbatch/sacct
#   launch/slurm/local_cluster.sh stop    # stop only the daemons this script started (not munged)
#
# Daemons (no systemd): munged, mariadbd (accounting database: submitit reads job states
# through sacct), slurmdbd, slurmctld, slurmd. Everything lives in $CIL_SLURM_DIR
# (default /tmp/cil-slurm); the system's /etc/slurm is left alone (we use SLURM_CONF).
# A new start gets a new controller state and a new accounting database, because a fresh
# controller re-uses job ids. Needs root (apt-get, daemons as slurm/mysql/munge).
set -Eeuo pipefail
# A step that fails names itself (a silent exit 1 left nothing to go on): -E runs the trap in
# functions too; only where set -e would stop the script.
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

STATE=${CIL_SLURM_DIR:-/tmp/cil-slurm}
PORT_BASE=${CIL_SLURM_PORT_BASE:-16817}        # slurmctld, +1 slurmd, +2 slurmdbd, +3 mariadb
CPUS=${CIL_SLURM_CPUS:-4}                      # advertised CPUs: two 2-task jobs fit at once
MEM_MB=${CIL_SLURM_MEM_MB:-16000}
NODE=$(hostname -s)
CONF="$STATE/etc/slurm.conf"
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "[local-cluster] $*" >&2; }

install_missing() {
  local missing=()
  for cmd in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing $PACKAGES (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
  fi
}

started() { echo "$1 $2" >>"$STATE/started"; }   # name pidfile

wait_for() {  # description, command...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

# Both test clusters (this one and multinode_cluster.sh's) may start at once: the apt install and
# munged's start are done under one host-wide lock, and munged, which they share, is left running.
SETUP_LOCK=${CIL_SLURM_SETUP_LOCK:-/tmp/cil-slurm-setup.lock}
lock_setup() { exec 9>"$SETUP_LOCK" && flock 9; }
unlock_setup() { flock -u 9 && exec 9>&-; }  # daemons started later do not inherit it

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running; re-using it"; return
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/cil-munged.pid
  wait_for munged bash -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
  local data="$STATE/mysql" run="$STATE/mysqld"
  install -d -o mysql -g mysql "$data" "$run"
  mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
    --skip-test-db >"$STATE/mariadb-install.log" 2>&1 ||
    { log "mariadb-install-db failed: $(tail -n 5 "$STATE/mariadb-install.log")"; return 1; }
  runuser -u mysql -- /usr/sbin/mariadbd --datadir="$data" --socket="$run/mysqld.sock" \
    --pid-file="$run/mysqld.pid" --port=$((PORT_BASE + 3)) --bind-address=127.0.0.1 \
    --log-error="$run/mysqld.err" --skip-name-resolve >"$run/stdout.log" 2>&1 &
  wait_for mariadb test -S "$run/mysqld.sock"
  started mariadbd "$run/mysqld.pid"
  wait_for "mariadb login" mariadb -S "$run/mysqld.sock" -e "SELECT 1"
  mariadb -S "$run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'cil-local-only';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

# slurmdbd.conf and an empty cgroup.conf beside $CONF (also used by multinode_cluster.sh)
write_dbd_configs() {
  cat >"$STATE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT_BASE + 3))
StorageUser=slurm
StoragePass=cil-local-only
StorageLoc=slurm_acct_db
CONF
  chmod 0600 "$STATE/etc/slurmdbd.conf"
  echo "# empty: no cgroups (ProctrackType=proctrack/linuxproc)" >"$STATE/etc/cgroup.conf"
}

# slurm.conf lines both local clusters share: scheduling, limits, accounting through slurmdbd
scheduler_and_accounting_conf() {
  cat <<CONF
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=defer_batch=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SlurmctldParameters=preempt_send_user_signal
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
KillWait=5
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 2))
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
CONF
}

write_configs() {
  install -d "$STATE/etc" "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
  cat >"$CONF" <<CONF
ClusterName=cil
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$(scheduler_and_accounting_conf)
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  write_dbd_configs
}

resolve_node() {
  if ! getent hosts "$NODE" >/dev/null; then
    log "adding $NODE to /etc/hosts (MASTER_ADDR is the node name)"
    echo "127.0.0.1 $NODE" >>/etc/hosts
  fi
}

start() {
  if [ -f "$STATE/started" ] && scontrol -M cil ping >/dev/null 2>&1; then
    log "already running ($STATE)"; return
  fi
  [ -f "$STATE/started" ] && stop
  rm -rf "$STATE" && mkdir -p "$STATE"
  : >"$STATE/started"
  lock_setup
  install_missing
  resolve_node
  write_configs
  export SLURM_CONF="$CONF"
  start_munge
  unlock_setup
  start_mariadb
  /usr/sbin/slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  started slurmdbd "$STATE/slurmdbd.pid"
  wait_for slurmdbd bash -c "sacctmgr -n list cluster"
  sacctmgr -i add cluster cil >/dev/null 2>&1 || true
  /usr/sbin/slurmctld -f "$CONF" -i
  started slurmctld "$STATE/slurmctld.pid"
  wait_for slurmctld scontrol ping
  /usr/sbin/slurmd -f "$CONF"
  started slurmd "$STATE/slurmd.pid"
  wait_for "node $NODE idle" bash -c "sinfo -h -n $NODE -o %t | grep -q idle"
  log "up: SLURM_CONF=$CONF, node $NODE with $CPUS CPUs"
}

stop() {
  [ -f "$STATE/started" ] || { log "nothing started from $STATE"; return 0; }
  export SLURM_CONF="$CONF"
  scancel --user="$(id -un)" >/dev/null 2>&1 || true
  tac "$STATE/started" | while read -r name pidfile; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      log "stopped $name ($pid)"
    fi
  done
  rm -f "$STATE/started"
}

# Sourced (launch/slurm/multinode_cluster.sh re-uses the functions above): define only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
