#!/usr/bin/env bash
# A 4-"host" blsfab run on one machine: 4 network namespaces joined by veth
# pairs and a bridge, one rank per namespace, tcp;ofi_rxm over the veths,
# bootstrap through a torch TCPStore on rank 0's namespace address.
#
#   sudo scripts/netns-multihost.sh            # as root; about half a minute
#
# Nothing touches the machine's own network: the bridge lives in a fifth
# namespace, the addresses (10.77.0.0/24) exist only inside the namespaces,
# and everything is deleted on exit (trap), also after a failure or Ctrl-C.
#
# After the alltoallv check it runs a short DLRM inference demo over the same
# namespaces (python -m dlrm_adapter --launcher torch): torch-bls vs gloo vs bls.
#
# Environment: PYTHON (python3), NRANKS (4), SUBNET (10.77.0), RANK_TIMEOUT (120 s),
# KEEP_LOGS=1 keeps the per-rank logs; DLRM=0 skips the DLRM demo, DLRM_TIMEOUT (150 s)
# bounds it, DLRM_ARGS replaces its size options (default below).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
NRANKS="${NRANKS:-4}"
SUBNET="${SUBNET:-10.77.0}"
RANK_TIMEOUT="${RANK_TIMEOUT:-120}"
DLRM="${DLRM:-1}"
DLRM_TIMEOUT="${DLRM_TIMEOUT:-150}"
# Few batches, small tables, bounds 0 and 8; test-and-sleep waits (--poll-us) so that
# waiting ranks leave the cores to computing ones. About 15-25 s with 4 ranks on 2 cores.
DLRM_ARGS="${DLRM_ARGS:---num-batches 100 --warmup 5 --rows-cap 20000 --batch-size 256 --bound 0,8 --poll-us 100}"
PORT="${MASTER_PORT:-29577}"
TAG="bls$$"                 # unique per run: namespaces bls<pid>-r0.., bls<pid>-sw
SWITCH="$TAG-sw"
LOGDIR="$(mktemp -d)"
PIDS=()

log() { printf '[netns-multihost] %s\n' "$*"; }
die() { printf '[netns-multihost] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN"
if ! command -v ip >/dev/null 2>&1; then
    log "iproute2 ('ip') is missing; installing it with apt-get"
    if command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 >/dev/null ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 >/dev/null; } ||
            die "apt-get could not install iproute2; install it and run again"
    fi
    command -v ip >/dev/null 2>&1 || die "'ip' (iproute2) not found; install iproute2"
fi
[ "$NRANKS" -ge 2 ] && [ "$NRANKS" -le 200 ] || die "NRANKS=$NRANKS must be in 2..200"
"$PYTHON" -c "import blsfab, torch" 2>/dev/null ||
    die "$PYTHON cannot import blsfab and torch; run scripts/setup.sh (or make setup) first"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for ((r = 0; r < NRANKS; r++)); do
        ip netns del "$TAG-r$r" 2>/dev/null || true
    done
    ip netns del "$SWITCH" 2>/dev/null || true
    if [ "${KEEP_LOGS:-0}" = 1 ]; then
        log "logs kept in $LOGDIR"
    else
        rm -rf "$LOGDIR"
    fi
    log "cleaned up: namespaces $TAG-* deleted"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the network -------------------------------------------------------------------
log "creating $NRANKS namespaces + a switch namespace ($TAG-*), subnet $SUBNET.0/24"
ip netns add "$SWITCH"
ip -n "$SWITCH" link set lo up
ip -n "$SWITCH" link add br0 type bridge
ip -n "$SWITCH" link set br0 up
for ((r = 0; r < NRANKS; r++)); do
    ns="$TAG-r$r"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Create the pair inside the rank's namespace, then move the far end to the switch.
    ip -n "$ns" link add "veth$r" type veth peer name "port$r"
    ip -n "$ns" link set "port$r" netns "$SWITCH"
    ip -n "$ns" addr add "$SUBNET.$((r + 1))/24" dev "veth$r"
    ip -n "$ns" link set "veth$r" up
    ip -n "$SWITCH" link set "port$r" master br0
    ip -n "$SWITCH" link set "port$r" up
done
for ((r = 0; r < NRANKS; r++)); do
    ip -n "$TAG-r$r" -o -4 addr show dev "veth$r" | awk -v ns="$TAG-r$r" '{print "  " ns ": " $2 " " $4}'
done

# ---- the ranks ----------------------------------------------------------------------
run_ranks() {   # run_ranks NAME SECONDS COMMAND...: one rank per namespace; fail if any fails
    local name="$1" limit="$2"; shift 2
    PIDS=()
    for ((r = 0; r < NRANKS; r++)); do
        # GLOO_SOCKET_IFNAME: gloo would otherwise resolve the (shared) host name.
        # IPATH_NO_BACKTRACE: libinfinipath (loaded by libfabric's psm provider) would
        # install a SIGTERM handler that writes a .btr file and can deadlock in exit();
        # timeout -k sends SIGKILL 10 s after SIGTERM in any case.
        ip netns exec "$TAG-r$r" env -u FI_PROVIDER \
            RANK="$r" WORLD_SIZE="$NRANKS" LOCAL_RANK=0 MASTER_ADDR="$SUBNET.1" \
            MASTER_PORT="$PORT" FI_TCP_IFACE="veth$r" GLOO_SOCKET_IFNAME="veth$r" \
            BLSFAB_PROVIDER=tcp IPATH_NO_BACKTRACE=1 \
            OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TORCH_CPP_LOG_LEVEL=ERROR \
            PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
            timeout -k 10 "$limit" "$@" >"$LOGDIR/$name.$r.log" 2>&1 &
        PIDS+=("$!")
    done
    local failed=0
    for ((r = 0; r < NRANKS; r++)); do
        if ! wait "${PIDS[$r]}"; then
            failed=1
            log "$name: rank $r failed; its log:"
            sed 's/^/    /' "$LOGDIR/$name.$r.log" | tail -n 40 >&2
        fi
    done
    PIDS=()
    PORT=$((PORT + 1))
    return "$failed"
}

log "alltoallv check: $NRANKS ranks, tcp;ofi_rxm, store bootstrap on $SUBNET.1:$PORT"
run_ranks check "$RANK_TIMEOUT" "$PYTHON" "$HERE/multihost_check.py" ||
    die "the alltoallv check failed"
grep -h -v '^libfabric' "$LOGDIR"/check.*.log | sort -s -k1,2 | sed 's/^/  /'

# ---- the DLRM demo: the same namespaces, launched torchrun-style --------------------
if [ "$DLRM" = 0 ]; then
    log "DLRM demo skipped (DLRM=0)"
elif ! (cd "$REPO" && "$PYTHON" -m dlrm_adapter --help 2>/dev/null) | grep -q -- '--launcher'; then
    log "DLRM demo skipped: python -m dlrm_adapter has no --launcher option"
else
    log "DLRM demo: $NRANKS ranks, python -m dlrm_adapter --launcher torch --demo" \
        "--backend gloo,torch-bls,bls --provider tcp $DLRM_ARGS (limit ${DLRM_TIMEOUT}s)"
    run_ranks dlrm "$DLRM_TIMEOUT" bash -c "cd '$REPO' && exec '$PYTHON' -m dlrm_adapter \
        --launcher torch --demo --backend gloo,torch-bls,bls --provider tcp $DLRM_ARGS \
        --no-progress" || die "the DLRM demo failed (or exceeded DLRM_TIMEOUT=${DLRM_TIMEOUT}s)"
    grep -h -v '^libfabric' "$LOGDIR"/dlrm.0.log | sed 's/^/  /'
fi
log "OK: $NRANKS ranks in $NRANKS namespaces passed"
