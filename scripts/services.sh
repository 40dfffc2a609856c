#!/usr/bin/env bash
# Installs (only when missing) and starts the real backends the tests talk to, on
# 127.0.0.1: tansu (Kafka API, :9092), redis (:6379) and osmem-server
# (Elasticsearch API, :9200). Source it, then call `start_services`; services it
# started are stopped by `stop_services`. Already-running servers are reused.
#
#   REFOLD_SERVICES_DIR  where broker state and logs go (default: target/services)
#   TANSU_VERSION        tansu release to install (default: 0.6.0)

SERVICES_DIR="${REFOLD_SERVICES_DIR:-$(pwd)/target/services}"
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
OSMEM_VERSION="${OSMEM_VERSION:-0.1.6}"
SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
STARTED_PIDS=()

say() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  say "$2 did not open port $1 within $3 s; see $SERVICES_DIR/$2.log"
  tail -n 30 "$SERVICES_DIR/$2.log" >&2 2>/dev/null || true
  return 1
}

tansu_bin() {
  if command -v tansu >/dev/null 2>&1; then command -v tansu
  elif [ -x "$HOME/.cargo/bin/tansu" ]; then echo "$HOME/.cargo/bin/tansu"
  else return 1; fi
}

ensure_tansu() {
  tansu_bin >/dev/null && return 0
  say "installing tansu $TANSU_VERSION with cargo (takes 7-9 minutes on 2 cores, once per machine)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql,postgres >&2
}

start_tansu() {
  if port_open 9092; then say "a Kafka-API broker already listens on 127.0.0.1:9092; reusing it"; return 0; fi
  ensure_tansu || return 1
  # A fresh store per run: tests use unique topic names, old data is only weight.
  rm -rf "$SERVICES_DIR/tansu"
  mkdir -p "$SERVICES_DIR/tansu"
  (cd "$SERVICES_DIR/tansu" && exec "$(tansu_bin)" broker \
      --listener-url tcp://127.0.0.1:9092 \
      --advertised-listener-url tcp://127.0.0.1:9092 \
      --storage-engine sqlite://tansu.db) >"$SERVICES_DIR/tansu.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_port 9092 tansu 60 && index_tansu_db "$SERVICES_DIR/tansu/tansu.db" && say "tansu listening on 127.0.0.1:9092"
}

# tansu 0.6 fetches every record's headers with a query on its `header` table,
# which has no index: each fetched record scans all headers ever written, so
# reading a topic whose records carry headers (refold's events carry `type`)
# grows quadratically (17k events: 57 s, or no answer at all; with this index:
# 0.5 s). The index is added once the broker has created its schema.
index_tansu_db() {
  python3 "$(dirname "${BASH_SOURCE[0]}")/index-tansu-db.py" "$1" \
    || { say "could not index the tansu header table"; return 1; }
}

start_redis() {
  # The binary is needed even when a redis already runs: a test starts (and
  # restarts) a private one to lose its data.
  if ! command -v redis-server >/dev/null 2>&1; then
    say "installing redis-server from Debian packages"
    { apt-get update -qq && apt-get install -y -qq redis-server; } >&2
  fi
  if port_open 6379; then say "redis already listens on 127.0.0.1:6379; reusing it"; return 0; fi
  mkdir -p "$SERVICES_DIR"
  redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize no --dir "$SERVICES_DIR" >"$SERVICES_DIR/redis.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_port 6379 redis 30 && say "redis listening on 127.0.0.1:6379"
}

osmem_bin() {
  python3 -c 'import osmem_server; print(osmem_server.resolve_binary())' 2>/dev/null
}

start_osmem() {
  if port_open 9200; then say "an Elasticsearch-API server already listens on 127.0.0.1:9200; reusing it"; return 0; fi
  if ! osmem_bin >/dev/null; then
    say "installing osmem-server $OSMEM_VERSION from PyPI"
    python3 -m pip install -q "osmem-server==$OSMEM_VERSION" >&2
  fi
  mkdir -p "$SERVICES_DIR"
  "$(osmem_bin)" -addr 127.0.0.1:9200 -no-stdin-watch >"$SERVICES_DIR/osmem.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_port 9200 osmem 30 && say "osmem-server listening on 127.0.0.1:9200"
}

# schemathesis (PyPI) fuzzes the running API against GET /openapi.json in
# tests/operations.rs; `schemathesis_bin` prints its `st` command.
schemathesis_bin() {
  python3 -c 'import sysconfig; print(sysconfig.get_path("scripts") + "/st")'
}

ensure_schemathesis() {
  local st
  st="$(schemathesis_bin)"
  if [ -x "$st" ] && "$st" --version 2>/dev/null | grep -q " $SCHEMATHESIS_VERSION\$"; then return 0; fi
  say "installing schemathesis $SCHEMATHESIS_VERSION from PyPI"
  python3 -m pip install -q "schemathesis==$SCHEMATHESIS_VERSION" >&2
}

start_services() {
  start_tansu && start_redis && start_osmem && ensure_schemathesis
}

stop_services() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
