# Shared by .ci/prometheus.sh and .ci/status-page.sh: starts a `qkdctl lab` in the background
# (the debug binary the tests built, built here if missing) and waits, with deadlines, for its
# lab.json and for a committed block at both daemons. Sets: work, lab_pid, health_addrs.
qkdctl="${CARGO_TARGET_DIR:-target}/debug/qkdctl"
[ -x "$qkdctl" ] || cargo build --quiet -p qkdctl --bin qkdctl
work="$(mktemp -d)"
"$qkdctl" lab --dir "$work/lab" --duration-s "${LAB_SECONDS:-90}" >"$work/lab.out" 2>&1 &
lab_pid=$!
pids_to_stop=("$lab_pid")
cleanup() {
  for pid in "${pids_to_stop[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Polls "$@" every 0.5 s until it succeeds or $deadline_s seconds pass.
poll() {
  local what=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$lab_pid" 2>/dev/null; then
      echo "timed out waiting for $what" >&2
      cat "$work/lab.out" >&2
      return 1
    fi
    sleep 0.5
  done
}

lab_running() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d.get("running") and d.get("daemons") else 1)' "$work/lab/lab.json"; }
poll "the lab's lab.json" 60 lab_running
mapfile -t health_addrs < <(python3 -c 'import json,sys; [print(d["health_addr"]) for d in json.load(open(sys.argv[1]))["daemons"]]' "$work/lab/lab.json")
committed() { curl -sf "http://$1/metrics" | grep -Eq '^qkd_blocks_total\{[^}]*outcome="committed"[^}]*\} [1-9]'; }
for addr in "${health_addrs[@]}"; do
  poll "a committed block at $addr" 90 committed "$addr"
done
