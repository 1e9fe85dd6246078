#!/usr/bin/env bash
# Schemathesis, the long run: every phase and every check against a server this script boots itself.
#
#   scripts/schemathesis.sh                      # 500 cases per operation, seed 1
#   scripts/schemathesis.sh 2000 --max-time 900  # more cases; anything after the number goes to `schemathesis run`
#   SEED=7 CHECKS=not_a_server_error,response_schema_conformance scripts/schemathesis.sh 200
#
# What it does, in a fresh temporary directory (kept: its path is printed):
#   1. boots the real CLI, `python -m inhouse serve`, on a free loopback port with auth on (`auth: keys`, a
#      bootstrap admin key from INHOUSE_ADMIN_KEY) and two fake-engine models: `echo` and `org/small` (a name
#      with a slash, a 32-token window), so it needs no weights and answers in milliseconds;
#   2. waits for /ready, then runs `schemathesis run <server>/openapi.json` with the admin key, phases
#      examples, coverage, fuzzing and stateful, positive and negative data, `--checks ${CHECKS:-all}`;
#   3. steers it with a hooks module (SCHEMATHESIS_HOOKS) that does what tests/e2e/test_openapi.py does: two
#      thirds of the generated bodies name a served model (a random name only ever gets a 404), and the admin
#      key is never revoked or rotated (Schemathesis reuses the key ids it reads from GET /admin/keys; losing
#      the admin key would turn the rest of the run into 401s).  Every other key may be revoked or rotated.
# Reports (JUnit, HAR of every exchange, a pytest file reproducing each failure) and the server log are
# written to that directory.  The exit code is Schemathesis'.
#
# Keep one worker: with `--workers 2` Hypothesis' lambda descriptions hit a CPython 3.11 ast bug in threads
# ("SystemError: AST constructor recursion depth mismatch"), reported as runtime errors, not API failures.
#
# Expect findings from the strict checks that the short test (tests/e2e/test_openapi.py) leaves out:
# `negative_data_rejection` flags the request models' deliberate leniency (pydantic's lax mode takes "5" for
# an integer and 0 for false), and `positive_data_acceptance` flags 400s for rules the schema does not state
# (lone surrogates in JSON strings, token_budget without budget_period, `prompt: []`, n × prompts over the
# server's max_choices, a key name already taken, content parts other than text).  The short test's checks
# must stay clean.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
EXAMPLES=${1:-500}
shift || true
SEED=${SEED:-1}
CHECKS=${CHECKS:-all}
KEY=ih-schemathesis-admin-0123456789abcdefghijkl
WORK=$(mktemp -d -t inhouse-schemathesis-XXXXXX)
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
SERVER_PID=

finish() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true; fi
    echo "reports and server log: $WORK"
}
trap finish EXIT

cat > "$WORK/inhouse.yaml" <<'YAML'
models:
  - {name: echo, path: unused, engine: fake, fake_reply: "Hello there friend"}
  - {name: org/small, path: unused, engine: fake, context_length: 32}
YAML

cat > "$WORK/inhouse_schemathesis_hooks.py" <<'PY'
"""Hooks for scripts/schemathesis.sh: keep the admin key, and name served models in generated bodies."""

import os
import zlib

import schemathesis

KEEP = {"admin", os.environ["INHOUSE_KEEP_KEY_ID"]}
MODELS = ("echo", "org/small")


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.path.endswith(("/revoke", "/rotate")) and case.path_parameters.get("key") in KEEP:
        case.path_parameters["key"] = "not-the-admin-key"
    model = case.body.get("model") if isinstance(case.body, dict) else None
    if isinstance(model, str):
        pick = zlib.crc32(model.encode("utf-8", "surrogatepass")) % (len(MODELS) + 1)
        if pick:
            case.body["model"] = MODELS[pick - 1]
PY

INHOUSE_ADMIN_KEY=$KEY INHOUSE_STATE_DIR=$WORK/state INHOUSE_CACHE_DIR=$WORK/cache \
    "$PYTHON" -m inhouse serve --config "$WORK/inhouse.yaml" --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
    if "$PYTHON" -c "import httpx, sys; sys.exit(httpx.get('$URL/ready').status_code != 200)" 2>/dev/null; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
    sleep 0.2
done
KEY_ID=$("$PYTHON" -c "import httpx; print(httpx.get('$URL/admin/keys/admin', headers={'Authorization': 'Bearer $KEY'}).json()['id'])")
echo "inhouse on $URL (log: $WORK/server.log), $EXAMPLES cases per operation, seed $SEED, checks $CHECKS"

set +e
cd "$WORK"  # Schemathesis keeps its example database and crash cache in the working directory
INHOUSE_KEEP_KEY_ID=$KEY_ID PYTHONPATH=$WORK SCHEMATHESIS_HOOKS=inhouse_schemathesis_hooks \
    "$(dirname "$PYTHON")/schemathesis" run "$URL/openapi.json" \
    --header "Authorization: Bearer $KEY" --checks "$CHECKS" --phases examples,coverage,fuzzing,stateful \
    --max-examples "$EXAMPLES" --seed "$SEED" --request-timeout 30 \
    --report junit,har,pytest --report-dir "$WORK/report" "$@"
status=$?
set -e
exit $status
