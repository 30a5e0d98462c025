#!/usr/bin/env bash
# Run benchmarks/run.py against a throwaway PostgreSQL-backed `prefect server start`.
#
#   benchmarks/postgres.sh                        # cases a,b,c, one task run per item
#   benchmarks/postgres.sh --cases a --scale 0.3  # any benchmarks.run arguments
#
# Needs PostgreSQL's initdb/pg_ctl on PATH (or PG_BIN) and, when run as root, a `postgres` user to own
# the cluster. The cluster and the server's home are deleted afterwards. The same two settings are what
# production needs: PREFECT_SERVER_DATABASE_CONNECTION_URL for the server, PREFECT_API_URL for every client.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
prefect="$(dirname "$py")/prefect"
pg_bin="${PG_BIN:-$(dirname "$(command -v pg_ctl)")}"
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

work="$(mktemp -d /tmp/batchllm-pg-XXXXXX)"
chmod 755 "$work"
pg_port="$(free_port)"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else bash -c "$*"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$work"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM -- "-$server_pid" 2>/dev/null || true
  sleep 2
  as_pg "$pg_bin/pg_ctl -D $work/data stop -m fast" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

as_pg "$pg_bin/initdb -D $work/data -U postgres --auth=trust" >/dev/null
as_pg "$pg_bin/pg_ctl -D $work/data -l $work/pg.log -o '-p $pg_port -k $work -c listen_addresses=127.0.0.1 -c max_connections=200' -w start" >/dev/null
psql="$(command -v psql || echo "$pg_bin/psql")"
"$psql" -h 127.0.0.1 -p "$pg_port" -U postgres -q -c "create database prefect"

api_port="$(free_port)"
api_url="http://127.0.0.1:$api_port/api"
mkdir -p "$work/home"
env -u PREFECT_API_URL PREFECT_HOME="$work/home" PREFECT_UI_ENABLED=false \
  PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_SERVER_LOGGING_LEVEL=WARNING \
  PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://postgres@127.0.0.1:$pg_port/prefect" \
  setsid "$prefect" server start --host 127.0.0.1 --port "$api_port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 180); do
  curl -sf "$api_url/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf "$api_url/health" >/dev/null || { tail -50 "$work/server.log"; exit 1; }

cd "$here"
"$py" -m benchmarks.run --api-url "$api_url" --server-only "$@"
