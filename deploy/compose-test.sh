#!/usr/bin/env bash
# The compose lab against the machine's Docker engine, with no container registry: the image
# qkd-link:latest is assembled from the binaries built here (and the C libraries they link),
# then docker-compose.yml runs unchanged. Checks:
#   1. the two demo applications obtain matching key pairs through ETSI GS QKD 014 (the nodes
#      authenticated by the pre-shared secret auth-init installed, not the placeholder);
#   2. Bob cut off the classical network, then reconnected: the link recovers;
#   3. docker-compose restart bob: keys flow again;
#   4. both stores hold the same keys once stopped;
#   5. with Eve on the fibre (profile eve) no key is delivered;
#   6. through the device emulator (profile emulator, QKD_DEVICE=grpc): matching keys again.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPOSE="docker-compose -p qkdci"
PROFILE=${PROFILE:-debug}
BIN=target/$PROFILE

log() { printf '== compose-test: %s\n' "$*"; }
fail() {
  log "FAILED: $*"
  $COMPOSE --profile eve --profile emulator logs --no-color --tail 60 || true
  $COMPOSE --profile eve --profile emulator down -v || true
  exit 1
}

# Counts lines matching $2 in the logs of service $1.
count() { $COMPOSE logs --no-color "$1" 2>/dev/null | grep -c -- "$2" || true; }

# Waits until `count $1 $2` reaches $3, for at most $4 seconds.
wait_count() {
  local deadline=$((SECONDS + $4))
  while [ "$(count "$1" "$2")" -lt "$3" ]; do
    [ $SECONDS -lt $deadline ] || fail "waited $4 s for $3 lines '$2' from $1 (have $(count "$1" "$2"))"
    sleep 1
  done
}

log "building binaries"
cargo build --quiet --bins -p alice -p bob -p qkdctl

log "assembling image qkd-link:latest from local binaries"
root=$(mktemp -d)
mkdir -p "$root/usr/local/bin" "$root/etc/qkd/pki" "$root/pki/ca" "$root/pki/nodes/alice" "$root/pki/nodes/bob" \
  "$root/pki/apps" "$root/var/lib/qkd" "$root/tmp" "$root/keks/alice" "$root/keks/bob" "$root/data/alice" \
  "$root/data/bob"
cp "$BIN/alice" "$BIN/bob" "$BIN/qkdctl" "$root/usr/local/bin/"
for lib in $(ldd "$BIN/alice" "$BIN/qkdctl" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo 'root:x:0:0:root:/root:/sbin/nologin' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
chmod 1777 "$root/tmp"
tar -C "$root" -c . | docker import --change 'WORKDIR /var/lib/qkd' - qkd-link:latest >/dev/null
rm -rf "$root"

$COMPOSE --profile eve --profile emulator down -v --remove-orphans >/dev/null 2>&1 || true

log "1. docker-compose up: demo applications must obtain matching keys"
$COMPOSE up -d --no-build
wait_count app-b "key pair matched" 5 240
[ "$(count app-b "MISMATCH")" -eq 0 ] || fail "a key pair did not match"
for node in alice bob; do
  [ "$(count $node "PUBLIC placeholder")" -eq 0 ] || fail "$node runs on the placeholder authentication secret"
done

log "2. Bob cut off the classical network, then reconnected"
before=$(count app-b "key pair matched")
docker network disconnect qkdci_classical qkdci_bob_1
wait_count bob "link down" 1 60
docker network connect --alias bob --alias bob-classical qkdci_classical qkdci_bob_1
wait_count app-b "key pair matched" $((before + 5)) 180

log "3. docker-compose restart bob"
before=$(count app-b "key pair matched")
$COMPOSE restart bob
wait_count app-b "key pair matched" $((before + 5)) 180
[ "$(count app-b "MISMATCH")" -eq 0 ] || fail "a key pair did not match"

log "4. stores identical once stopped"
$COMPOSE stop app-a app-b
$COMPOSE stop bob
$COMPOSE stop alice
summary() {
  docker run --rm -v "qkdci_$1-data:/data" -v "qkdci_$1-kek:/kek:ro" qkd-link:latest \
    qkdctl store summary --data-dir /data --kek /kek/store.kek --json
}
a=$(summary alice); b=$(summary bob)
echo "alice: $a" | tr -d '\n '; echo
echo "bob:   $b" | tr -d '\n '; echo
da=$(echo "$a" | grep '"digest"'); db=$(echo "$b" | grep '"digest"')
[ "$da" = "$db" ] || fail "alice's and bob's stores differ"
echo "$a" | grep -q '"n_keys": 0' && fail "no keys stored"
$COMPOSE down -v

log "5. Eve on the fibre: no key may be delivered"
BOB_FIBRE_ADDR=eve:7001 $COMPOSE --profile eve up -d --no-build
wait_count bob "block aborted" 2 240
[ "$(count bob "block committed")" -eq 0 ] || fail "a block was committed with Eve on the fibre"
[ "$(count app-b "key pair matched")" -eq 0 ] || fail "a key was delivered with Eve on the fibre"
$COMPOSE --profile eve down -v

log "6. through the device emulator: the daemons' grpc drivers, matching keys"
QKD_DEVICE=grpc $COMPOSE --profile emulator up -d --no-build
wait_count app-b "key pair matched" 3 240
[ "$(count app-b "MISMATCH")" -eq 0 ] || fail "a key pair did not match through the emulator"
[ "$(count alice "SIMULATED")" -ge 1 ] || fail "alice did not say that the channel is simulated"
$COMPOSE --profile emulator down -v

log "passed"
