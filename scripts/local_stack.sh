#!/usr/bin/env bash
# The docker-compose stack from local binaries (no Docker): a private hardened Mosquitto rendered from
# broker_config/mosquitto.prod.conf, a separate PostgreSQL database, and `koala serve`.
#
#   scripts/local_stack.sh [--no-server] [--dir runs/local-stack]
#
# Env: KOALA_PG (default postgresql://127.0.0.1:5432), KOALA_STACK_DB (default koala_local),
#      KOALA_TLS_PORT / KOALA_PLAIN_PORT / KOALA_HTTP_PORT (default: free ports).
# Prints the URLs and the env a server/device needs, then waits; Ctrl-C stops everything it started.
# Never touches the system broker (/etc/mosquitto) or the `test` database.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="runs/local-stack" SERVER=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-server) SERVER=0; shift ;;
    --dir) DIR="$2"; shift 2 ;;
    *) echo "usage: $0 [--no-server] [--dir DIR]" >&2; exit 2 ;;
  esac
done
PY=.venv/bin/python KOALA=.venv/bin/koala
free_port() { "$PY" -c 'from server_app.provisioning.local_broker import free_port; print(free_port())'; }
TLS_PORT="${KOALA_TLS_PORT:-$(free_port)}" PLAIN_PORT="${KOALA_PLAIN_PORT:-$(free_port)}"
HTTP_PORT="${KOALA_HTTP_PORT:-$(free_port)}"
PG="${KOALA_PG:-postgresql://127.0.0.1:5432}" DBNAME="${KOALA_STACK_DB:-koala_local}"
[ "$DBNAME" != "test" ] || { echo "refusing to use the shared 'test' database" >&2; exit 2; }
mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"

if psql "$PG/postgres" -tAc "select 1" >/dev/null 2>&1; then
  psql "$PG/postgres" -tAc "select 1 from pg_database where datname='$DBNAME'" | grep -q 1 \
    || psql "$PG/postgres" -qc "create database \"$DBNAME\""
  export KOALA_DATABASE__URL="postgresql+psycopg://${PG#postgresql://}/$DBNAME"
else
  echo "[stack] PostgreSQL not reachable at $PG: using SQLite" >&2
  export KOALA_DATABASE__URL="sqlite:///$DIR/registry.db"
fi

"$KOALA" provision broker-files --out "$DIR/broker" --tls-port "$TLS_PORT" --tls-bind 127.0.0.1 \
  --plain-port "$PLAIN_PORT" >/dev/null
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
"$MOSQ" -c "$DIR/broker/mosquitto.conf" >"$DIR/mosquitto.out" 2>&1 &
pids+=($!); echo "$!" >"$DIR/broker/mosquitto.pid"
"$PY" -c "from server_app.provisioning.local_broker import wait_listening as w; w($TLS_PORT); w($PLAIN_PORT)"

# Settings env (server_app/config.py); the secret goes to the server's environment only, not stack.env.
export KOALA_BROKER__URL="mqtt://127.0.0.1:$PLAIN_PORT" KOALA_BROKER__USERNAME=koala-server KOALA_BROKER__SHARED_GROUP=koala
PW_FILE="$DIR/broker/secrets/koala-server.password"
cat >"$DIR/stack.env" <<ENV
KOALA_DATABASE__URL=$KOALA_DATABASE__URL
KOALA_BROKER__URL=$KOALA_BROKER__URL
KOALA_BROKER__USERNAME=koala-server
KOALA_BROKER__SHARED_GROUP=koala
KOALA_BROKER_PASSWORD_FILE=$PW_FILE
KOALA_BROKER_CA_FILE=$DIR/broker/certs/ca.crt
KOALA_DEVICE_BROKER_URL=mqtts://127.0.0.1:$TLS_PORT
KOALA_BROKER_DIR=$DIR/broker
KOALA_BROKER_PID_FILE=$DIR/broker/mosquitto.pid
KOALA_HTTP=http://127.0.0.1:$HTTP_PORT
ENV

if [ "$SERVER" = 1 ]; then
  if "$KOALA" serve --help >/dev/null 2>&1; then
    KOALA_BROKER__PASSWORD="$(cat "$PW_FILE")" "$KOALA" serve --host 127.0.0.1 --port "$HTTP_PORT" >"$DIR/server.out" 2>&1 &
    pids+=($!)
  else
    echo "[stack] \`koala serve\` is not available yet: broker and database only" >&2
  fi
fi
echo "[stack] broker: mqtts://127.0.0.1:$TLS_PORT (devices), mqtt://127.0.0.1:$PLAIN_PORT (server, loopback)"
echo "[stack] registry: $KOALA_DATABASE__URL   http: http://127.0.0.1:$HTTP_PORT"
echo "[stack] env for clients: $DIR/stack.env   add devices: koala provision add ID --arch A --broker-dir $DIR/broker --pid-file $DIR/broker/mosquitto.pid"
echo "[stack] ready (Ctrl-C to stop)"
wait -n "${pids[@]}"
