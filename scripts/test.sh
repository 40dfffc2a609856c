#!/usr/bin/env bash
# The whole test suite against real backends: starts tansu, redis and osmem-server
# on 127.0.0.1 and installs schemathesis (installing only what is missing), runs
# every test, stops what it started.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test kafka_write_path).
set -euo pipefail
cd "$(dirname "$0")/.."
# docker-compose.yml, Dockerfile and deploy/, checked without Docker (none here).
python3 scripts/check-compose.py
source scripts/services.sh
trap stop_services EXIT
start_services

export TEST_KAFKA_BROKERS=127.0.0.1:9092
export TEST_REDIS_URL=redis://127.0.0.1:6379
export TEST_ELASTICSEARCH_URL=http://127.0.0.1:9200
TEST_TANSU_BIN="$(tansu_bin)"
export TEST_TANSU_BIN
TEST_SCHEMATHESIS="$(schemathesis_bin)"
export TEST_SCHEMATHESIS

cargo test --locked "$@"
