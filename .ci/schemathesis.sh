#!/usr/bin/env bash
# Fuzzes the ETSI GS QKD 014 key delivery API with schemathesis against docs/openapi.yaml.
#
# Installs schemathesis from PyPI into a throw-away virtualenv, starts two KMEs (`qkdctl keys
# pair`: real HTTPS with mutual TLS, real peer channel, real sled stores, 40000 ready units), and
# runs schemathesis as SAE `sae-a1` against KME A.
#
# Checks left out, and why:
# - positive_data_acceptance: a schema-valid request is refused when the SAE IDs are not a
#   registered pair, or the key IDs were never issued; validity depends on configuration and
#   state, which the schema cannot express.
# - use_after_free, ensure_resource_availability: the API creates and deletes no resources by
#   REST verbs (keys are consumed by design).
#
# Environment: ST_MAX_EXAMPLES (default 100), ST_SEED (default random), ST_VERSION (default
# ">=4,<5").
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
kme_pid=""
cleanup() {
    if [[ -n "$kme_pid" ]] && kill -0 "$kme_pid" 2>/dev/null; then
        kill -TERM "$kme_pid" 2>/dev/null || true
        wait "$kme_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== schemathesis: install"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis${ST_VERSION:->=4,<5}"
"$work/venv/bin/st" --version

echo "== schemathesis: build and start two KMEs"
cargo build --quiet -p qkdctl
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/qkdctl" keys pair --dir "$work" --units 40000 >"$work/kme.log" 2>&1 &
kme_pid=$!
for _ in $(seq 1 600); do
    [[ -e "$work/ready" ]] && break
    if ! kill -0 "$kme_pid" 2>/dev/null; then
        echo "the KMEs exited before they were ready:" >&2
        cat "$work/kme.log" >&2
        exit 1
    fi
    sleep 0.1
done
[[ -e "$work/ready" ]] || { echo "the KMEs were not ready after 60 s" >&2; cat "$work/kme.log" >&2; exit 1; }
url="$(cat "$work/url")"
echo "KME A at $url"

echo "== schemathesis: run"
seed_args=()
[[ -n "${ST_SEED:-}" ]] && seed_args=(--seed "$ST_SEED")
status=0
"$work/venv/bin/st" run docs/openapi.yaml \
    --url "$url" \
    --tls-verify "$work/ca.crt" \
    --request-cert "$work/client.pem" \
    --checks all \
    --exclude-checks positive_data_acceptance,use_after_free,ensure_resource_availability \
    --max-examples "${ST_MAX_EXAMPLES:-100}" \
    --request-timeout 15 \
    --no-color \
    "${seed_args[@]}" || status=$?

kill -TERM "$kme_pid"
wait "$kme_pid" || { echo "the KME process failed:" >&2; cat "$work/kme.log" >&2; exit 1; }
kme_pid=""
grep -E "stopping the KME pair" "$work/kme.log" || true
exit "$status"
