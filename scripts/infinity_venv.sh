#!/usr/bin/env bash
# Builds .venv-infinity: infinity-emb (the embedding server bench/embeddings.py compares inhouse with), pinned by
# requirements-infinity.txt.
#
# Kept apart from .venv because infinity-emb needs numpy<2 and sentence-transformers<4, and inhouse pins newer
# ones. Idempotent: a stamp inside the venv holds the hash of the requirements file and the interpreter version;
# when both match, the venv is reused as it is, otherwise it is rebuilt from scratch. The build checks that torch
# is the CPU wheel (+cpu): a CUDA build means the torch pin was lost. Override the interpreter with
# INFINITY_PYTHON=/path/to/python3 (3.9-3.13; default python3) and the location with INFINITY_VENV=DIR.
# Prints the venv's python on stdout (everything else goes to stderr).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INFINITY_VENV:-$repo/.venv-infinity}"
python="${INFINITY_PYTHON:-python3}"
requirements="$repo/requirements-infinity.txt"
stamp="$venv/.requirements.sha256"
log() { echo "infinity_venv: $*" >&2; }

# A pyenv shim only works under the version it saw: use the interpreter's real path.
python="$("$python" -c 'import sys; print(sys.executable)')" || { log "no working $python"; exit 1; }

# Serialise concurrent builds; the lock is taken on the requirements file, so no lock file is left behind.
exec 9<"$requirements"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

want="$(sha256sum "$requirements" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import infinity_emb' >/dev/null 2>&1; then
    log "reusing $venv"
    echo "$venv/bin/python"
    exit 0
fi

log "building $venv with $python (torch is large: a minute or two)"
rm -rf "$venv"
"$python" -m venv "$venv"
echo '*' > "$venv/.gitignore"  # git ignores the venv without an entry in the repository's .gitignore
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
"$venv/bin/python" - >&2 <<'EOF'
import torch
import infinity_emb.infinity_server  # noqa: F401  (the server and its FastAPI app import)
import sentence_transformers  # noqa: F401

assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not the CPU wheel; check the torch pin"
EOF
# The stamp is written last, so an interrupted build is redone next time.
echo "$want" > "$stamp"
log "built $venv"
echo "$venv/bin/python"
