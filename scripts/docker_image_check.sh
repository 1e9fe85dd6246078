#!/usr/bin/env bash
# Builds deploy/docker/Dockerfile and proves the image works with no network: it turns healthy (/ready), runs as
# uid 10001 on a read-only root filesystem, answers a chat completion and an embedding with the baked-in models,
# and on `docker stop` drains and exits 0. Needs a Docker engine and the base image's registry, which CI does not
# have, so it is not part of `make test`; docs/deploy.md says where it ran.
#
#   scripts/docker_image_check.sh                                     # CPU image
#   scripts/docker_image_check.sh --build-arg VARIANT=cuda            # any extra `docker build` arguments
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-inhouse:check}
name=inhouse-check-$$
key=ih-image-check-0123456789abcdef

docker build -f deploy/docker/Dockerfile -t "$image" "$@" .
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
docker run -d --name "$name" --network none --read-only --tmpfs /tmp -e INHOUSE_ADMIN_KEY="$key" "$image" >/dev/null

started=$(date +%s)
until docker exec "$name" python /opt/inhouse/bin/healthcheck.py 2>/dev/null; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ] || [ $(( $(date +%s) - started )) -gt 300 ]; then
        docker logs "$name" 2>&1 | tail -30
        echo "FAILED: not ready within 300 s" >&2
        exit 1
    fi
    sleep 1
done
echo "ready $(( $(date +%s) - started )) s after docker run"
status=starting
for _ in $(seq 1 60); do  # Docker's own HEALTHCHECK agrees (it runs every 10 s)
    status=$(docker inspect -f '{{.State.Health.Status}}' "$name")
    [ "$status" = healthy ] && break
    sleep 2
done
[ "$status" = healthy ] || { echo "FAILED: docker reports $status" >&2; exit 1; }
echo "healthy (offline, read-only root filesystem)"

[ "$(docker exec "$name" id -u)" = 10001 ] || { echo "FAILED: not uid 10001" >&2; exit 1; }
docker exec -i -e KEY="$key" "$name" python - <<'PY'
import json, os, urllib.request

def post(path, body):
    request = urllib.request.Request("http://127.0.0.1:8000" + path, data=json.dumps(body).encode(),
                                     headers={"Authorization": "Bearer " + os.environ["KEY"],
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.load(answer)

chat = post("/v1/chat/completions", {"model": "smollm2-135m-instruct", "max_tokens": 16, "temperature": 0,
                                     "messages": [{"role": "user", "content": "What is the capital of France?"}]})
print("chat:", chat["choices"][0]["message"]["content"])
vectors = post("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": ["hello"]})
print("embedding dimensions:", len(vectors["data"][0]["embedding"]))
assert "Paris" in chat["choices"][0]["message"]["content"] and len(vectors["data"][0]["embedding"]) == 384
PY

docker stop -t 40 "$name" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
docker logs "$name" 2>&1 | grep -q 'draining: refusing new requests' || { echo "FAILED: no drain in the log" >&2; exit 1; }
[ "$code" = 0 ] || { echo "FAILED: exit code $code after docker stop" >&2; exit 1; }
echo "docker stop: drained, exit 0"
echo "PASSED: $image"
