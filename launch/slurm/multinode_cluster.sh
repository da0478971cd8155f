#!/usr/bin/env bash
# A real 3-node SLURM cluster on one machine: each compute node is a slurmd in its own network
# namespace (own address, veth pair to a bridge on the host) and UTS namespace (own hostname).
#
#   launch/slurm/multinode_cluster.sh start   # network, daemons; restarts a node that died
#   launch/slurm/multinode_cluster.sh env     # print `export SLURM_CONF=...`
#   launch/slurm/multinode_cluster.sh stop    # stop what it started, remove namespaces/bridge
#
# The host keeps munged (shared), mariadbd, slurmdbd and slurmctld; slurmctld listens on the
# bridge address 198.18.0.1. Nodes cilnode1..3 are 198.18.0.11..13 (RFC 2544 benchmarking
# range, /etc/hosts entries for the host and the nodes alike). A 2-node job leaves a spare node,
# where SLURM requeues it after losing one, as on a real cluster. The namespaces have no route
# beyond the bridge: traffic flows only between the nodes and the host. State, logs, spool and
# pid files (per node, %n) live in $CIL_SLURM_MN_DIR (default /tmp/cil-slurm-mn); ports from
# $CIL_SLURM_MN_PORT_BASE (default 16837): it runs beside local_cluster.sh's cluster.
# Timeouts that bound a lost node (docs/multinode_slurm.md): SlurmdTimeout=10 (a silent node is
# DOWN after 10 s, its jobs end as NODE_FAIL), KillOnBadExit=1 (a rank that fails ends the step).
# Needs root (ip netns, veth, bridge, unshare --uts, daemons).
set -euo pipefail

MN_STATE=${CIL_SLURM_MN_DIR:-/tmp/cil-slurm-mn}
MN_PORT_BASE=${CIL_SLURM_MN_PORT_BASE:-16837}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/slurm/local_cluster.sh
CIL_SLURM_DIR=$MN_STATE CIL_SLURM_PORT_BASE=$MN_PORT_BASE source "$HERE/local_cluster.sh"
CPUS=${CIL_SLURM_MN_CPUS:-4}                     # per node
MEM_MB=${CIL_SLURM_MN_MEM_MB:-8000}
BRIDGE=cilmnbr0
HOST_ADDR=198.18.0.1
NODES=(cilnode1 cilnode2 cilnode3)
ADDRS=(198.18.0.11 198.18.0.12 198.18.0.13)
HOSTS_MARK="# cil-slurm-multinode"

log() { echo "[multinode-cluster] $*" >&2; }

network_up() {  # bridge on the host, one namespace + veth per node, /etc/hosts entries
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  grep -q "inet $HOST_ADDR/" <<<"$(ip addr show dev "$BRIDGE")" || ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i node veth
  for i in "${!NODES[@]}"; do
    node=${NODES[$i]} veth=cilmn$((i + 1))
    grep -qw "^$node" <<<"$(ip netns list)" || ip netns add "$node"
    if ! ip link show "$veth" >/dev/null 2>&1; then
      ip link add "$veth" type veth peer name "$veth-p"
      ip link set "$veth-p" netns "$node"
      ip netns exec "$node" ip link set "$veth-p" name eth0
      ip netns exec "$node" ip addr add "${ADDRS[$i]}/24" dev eth0
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip netns exec "$node" ip link set lo up
    ip netns exec "$node" ip link set eth0 up
    grep -q "^${ADDRS[$i]} $node " /etc/hosts ||
      echo "${ADDRS[$i]} $node $HOSTS_MARK" >>/etc/hosts
  done
}

network_down() {
  local i node
  for i in "${!NODES[@]}"; do
    node=${NODES[$i]}
    if grep -qw "^$node" <<<"$(ip netns list)"; then
      ip netns pids "$node" | xargs -r kill -9 2>/dev/null || true
      ip netns del "$node"
    fi
    ip link del "cilmn$((i + 1))" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  sed -i "/ $HOSTS_MARK\$/d" /etc/hosts
}

write_configs() {
  install -d "$STATE/etc" "$STATE/ctld" "$STATE/log"
  local i nodes=""
  for i in "${!NODES[@]}"; do
    install -d "$STATE/slurmd/${NODES[$i]}"
    nodes+="NodeName=${NODES[$i]} NodeAddr=${ADDRS[$i]} CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"$'\n'
  done
  # Epilog: a node named in $STATE/etc/epilog_delay/ (a file holding seconds, written by a test)
  # keeps its ended jobs that long in COMPLETING. tests/test_multinode_slurm.py uses it to widen
  # the window in which the accounting database already shows a requeued job's NODE_FAIL while
  # the controller still holds the job; without a file the epilog returns at once.
  install -d "$STATE/etc/epilog_delay"
  cat >"$STATE/etc/epilog.sh" <<EPILOG
#!/bin/sh
delay=$STATE/etc/epilog_delay/\$SLURMD_NODENAME
[ -f "\$delay" ] && sleep "\$(cat "\$delay")"
exit 0
EPILOG
  chmod +x "$STATE/etc/epilog.sh"
  cat >"$CONF" <<CONF
ClusterName=cilmn
SlurmctldHost=$NODE($HOST_ADDR)
SlurmUser=root
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
$(scheduler_and_accounting_conf)
SlurmdTimeout=10
KillOnBadExit=1
Epilog=$STATE/etc/epilog.sh
${nodes}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
  write_dbd_configs
}

conf_has_all_nodes() {  # a cluster started by an older copy of this script lacks some
  local node
  for node in "${NODES[@]}"; do grep -q "^NodeName=$node " "$CONF" || return 1; done
}

node_alive() { [ -f "$STATE/slurmd-$1.pid" ] && kill -0 "$(cat "$STATE/slurmd-$1.pid")" 2>/dev/null; }

start_node() {  # slurmd in the node's network namespace, with its hostname (UTS namespace)
  local node=$1
  rm -f "$STATE/slurmd-$node.pid"
  # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd reads
  nsenter --net="/run/netns/$node" unshare --uts \
    bash -c "hostname $node && exec /usr/sbin/slurmd -f $CONF"
  grep -q "^slurmd-$node " "$STATE/started" || started "slurmd-$node" "$STATE/slurmd-$node.pid"
}

wait_nodes_up() {  # responding (a node finishing a job is up too), not down or drained
  local node
  for node in "${NODES[@]}"; do
    wait_for "node $node up" bash -c "sinfo -h -n $node -o %t | grep -qxE 'idle|mix|alloc|comp'"
  done
}

start() {
  export SLURM_CONF="$CONF"
  if [ -f "$STATE/started" ] && scontrol ping >/dev/null 2>&1 && conf_has_all_nodes; then
    network_up
    local node
    for node in "${NODES[@]}"; do
      node_alive "$node" || { log "restarting $node"; start_node "$node"; }
    done
    wait_nodes_up
    log "running ($STATE)"; return
  fi
  [ -f "$STATE/started" ] && stop
  rm -rf "$STATE" && mkdir -p "$STATE"
  : >"$STATE/started"
  lock_setup
  install_missing
  command -v unshare >/dev/null && command -v ip >/dev/null ||
    { log "needs ip (iproute2) and unshare (util-linux)"; exit 2; }
  network_up
  write_configs
  start_munge
  unlock_setup
  start_mariadb
  /usr/sbin/slurmdbd
  started slurmdbd "$STATE/slurmdbd.pid"
  wait_for slurmdbd bash -c "sacctmgr -n list cluster"
  sacctmgr -i add cluster cilmn >/dev/null 2>&1 || true
  /usr/sbin/slurmctld -f "$CONF" -i
  started slurmctld "$STATE/slurmctld.pid"
  wait_for slurmctld scontrol ping
  local node
  for node in "${NODES[@]}"; do start_node "$node"; done
  wait_nodes_up
  log "up: SLURM_CONF=$CONF, nodes ${NODES[*]} (${ADDRS[*]}) with $CPUS CPUs each"
}

mn_stop() {
  stop  # local_cluster.sh's: cancels the jobs, stops the daemons listed in $STATE/started
  network_down
  log "network removed (namespaces ${NODES[*]}, bridge $BRIDGE)"
}

case "${1:-}" in
  start) start ;;
  stop) mn_stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
