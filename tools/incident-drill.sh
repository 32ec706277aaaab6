#!/usr/bin/env bash
# Runs the incident drill of docs/incident-drill.md against a real Redis and a fresh SQLite
# file, and prints the transcript as Markdown. Usage: tools/incident-drill.sh [REDIS_URL]
# Keys live under a unique prefix, removed at the end.
set -euo pipefail
export CFN_REDIS_URL="${1:-${CFN_REDIS_URL:-redis://127.0.0.1:6379/0}}"
export CFN_KEY_PREFIX="drill-$RANDOM:"
work="$(mktemp -d)"
export CFN_DURABLE_URL="sqlite:///$work/cfn.db"
export COLUMNS=110
cli=(cfn-checkpoint)
P="$CFN_KEY_PREFIX"

cleanup() {
    [ -n "${watch_pid:-}" ] && kill "$watch_pid" 2>/dev/null || true
    python - <<PY
import redis
r = redis.Redis.from_url("$CFN_REDIS_URL")
keys = list(r.scan_iter(match="$P*", count=1000))
if keys:
    r.delete(*keys)
PY
    rm -rf "$work"
}
trap cleanup EXIT

show() {  # show <command...>: print the command and its output as a console block
    printf '```console\n$ %s\n' "${*/#*cfn-checkpoint/cfn-checkpoint}"
    "$@" 2>&1 || printf '[exit %s]\n' "$?"
    printf '```\n\n'
}

agents() {  # agents <iteration>: the task's agents write their state, as the platform does
    python - "$1" <<PY
import json, sys
import redis
i = int(sys.argv[1])
r = redis.Redis.from_url("$CFN_REDIS_URL")
p = "$P"
for agent in ("coordinator", "coder", "reviewer", "tester"):
    r.set(f"{p}agent:task-42:{agent}", json.dumps({"agent": agent, "iteration": i, "status": "working"}))
r.set(f"{p}swarm:task-42:phase", f"iteration-{i}", px=600_000)
r.rpush(f"{p}queue:task-42:reviews", json.dumps({"patch": f"p{i}"}))
r.set(f"{p}lock:task-42:workspace", "coder-7f3a", px=900_000)
from cfn_checkpoint.durable.sqlite import SqliteStore
store = SqliteStore.from_url("$CFN_DURABLE_URL")
store.record_audit_event("task-42", "iteration_done", agent_id="coordinator", details={"iteration": i})
store.record_agent_metric("task-42", "coder", "confidence", 0.5 + i / 10)
store.close()
PY
}

echo "Transcript of \`tools/incident-drill.sh\`, run on $(date -u +%Y-%m-%d) against Redis"
echo "$(redis-cli -u "$CFN_REDIS_URL" info server | grep redis_version | tr -d '\r') with a fresh SQLite file; key prefix \`$P\`."
echo
echo "## 1. Normal operation: agents work, \`watch\` checkpoints every 2 s"
echo
agents 1
"${cli[@]}" watch --interval 2s --task task-42 >"$work/watch.log" 2>&1 &
watch_pid=$!
sleep 3
agents 2
sleep 2.5
agents 3
sleep 2.5
echo "Three iterations of agent work, 2.5 s apart (plain Redis writes)."
echo
echo "## 2. The incident: Redis loses the task's runtime state"
echo
python - <<PY
import redis
r = redis.Redis.from_url("$CFN_REDIS_URL")
keys = list(r.scan_iter(match="${P}*:task-42:*", count=1000))
r.delete(*keys)
print(f"Deleted {len(keys)} keys of task-42 (what a Redis restart without persistence does).")
PY
echo
sleep 2.5
echo "## 3. On call: look, compare, rehearse, recover, verify"
echo
show "${cli[@]}" tasks
show "${cli[@]}" list task-42
newest="$("${cli[@]}" --json list task-42 --limit 1 | python -c 'import json,sys; print(json.load(sys.stdin)[0]["checkpoint_id"])')"
show "${cli[@]}" diff "$newest" --live
show "${cli[@]}" recover task-42 --dry-run
show "${cli[@]}" recover task-42
show "${cli[@]}" verify --all
show "${cli[@]}" diff "$newest" --live
echo "## 4. \`watch\` is stopped with SIGTERM"
echo
kill -TERM "$watch_pid"
status=0
wait "$watch_pid" || status=$?
watch_pid=""
printf '```console\n$ cfn-checkpoint watch --interval 2s --task task-42   # its log\n'
cat "$work/watch.log"
printf '[exit %s]\n```\n' "$status"
