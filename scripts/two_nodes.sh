#!/usr/bin/env bash
# Two "nodes" on one machine for the cluster tests (root only): node A is the host's network
# namespace, node B a network namespace NAME; a veth pair joins them in a private /24.
#
#   scripts/two_nodes.sh up NAME A_ADDR B_ADDR   # e.g. up arl4242 10.231.42.1 10.231.42.2
#   scripts/two_nodes.sh exec NAME CMD…          # run CMD on node B
#   scripts/two_nodes.sh crash NAME              # node B dies: SIGKILL everything running in B
#   scripts/two_nodes.sh down NAME               # kill what runs in B, remove B and the link
#
# Interface names are NAME plus "a"/"b" (at most 15 characters: keep NAME short). `down` is
# idempotent and safe after a partial `up`. Traffic stays inside what this script made.
set -euo pipefail

usage() { echo "usage: $0 up NAME A_ADDR B_ADDR | exec NAME CMD… | crash NAME | down NAME" >&2; exit 2; }

# Everything in B was started there by the test that made B: it may all be killed. Again until
# none is left: a process may have been forking while the first pass killed its parent.
crash() {
    local pids tries=0
    while pids=$(ip netns pids "$1") && [ -n "$pids" ] && [ $tries -lt 50 ]; do
        for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
        tries=$((tries + 1))
        sleep 0.1
    done
}
[ $# -ge 2 ] || usage
cmd=$1 name=$2
shift 2
if [ ${#name} -gt 14 ]; then echo "two_nodes: NAME=$name: at most 14 characters (interface names)" >&2; exit 2; fi

case $cmd in
up)
    [ $# -eq 2 ] || usage
    a=$1 b=$2
    ip netns add "$name"
    ip link add "${name}a" type veth peer name "${name}b"
    ip link set "${name}b" netns "$name"
    ip addr add "$a/24" dev "${name}a"
    ip link set "${name}a" up
    ip netns exec "$name" ip addr add "$b/24" dev "${name}b"
    ip netns exec "$name" ip link set "${name}b" up
    ip netns exec "$name" ip link set lo up
    ;;
exec)
    [ $# -ge 1 ] || usage
    exec ip netns exec "$name" "$@"
    ;;
crash)
    crash "$name"
    ;;
down)
    if ip netns list | grep -qw "$name"; then
        crash "$name"
        ip netns del "$name"
    fi
    ip link del "${name}a" 2>/dev/null || true  # usually gone with B (a veth dies with its peer)
    ;;
*)
    usage
    ;;
esac
