#!/usr/bin/env bash
# Builds .venv-dify: Python 3.12 with Dify's plugin SDK pinned by requirements-dify.txt.
#
# Idempotent: a stamp inside the venv holds the hash of the requirements file and the interpreter
# version; when both match, the venv is reused as it is. Otherwise it is rebuilt from scratch.
# Override the interpreter with DIFY_PYTHON=/path/to/python3.12 and the location with DIFY_VENV=DIR.
# Prints the venv's python on stdout (everything else goes to stderr).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DIFY_VENV:-$repo/.venv-dify}"
requirements="$repo/requirements-dify.txt"
stamp="$venv/.requirements.sha256"

log() { echo "dify_venv: $*" >&2; }

# A candidate counts only if it really runs and is 3.12 (a pyenv shim on PATH may exist and still fail).
is_312() { [ -n "$1" ] && "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

# Prints the interpreter's real path (not a pyenv shim, which only works under the PYENV_VERSION it saw).
real_path() { "$1" -c 'import sys; print(sys.executable)'; }

find_python() {
    local candidate
    for candidate in "${DIFY_PYTHON:-}" "$(command -v python3.12 || true)" \
                     "${HOME:-/nonexistent}"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if is_312 "$candidate"; then
            real_path "$candidate"
            return 0
        fi
    done
    # A pyenv shim for 3.12 fails unless that version is selected: select it for this lookup only.
    if command -v pyenv >/dev/null 2>&1; then
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -V -r); do
            candidate="$(PYENV_VERSION="$version" pyenv which python3.12 2>/dev/null || true)"
            if is_312 "$candidate"; then
                real_path "$candidate"
                return 0
            fi
        done
    fi
    return 1
}

python="$(find_python)" || {
    log "no working Python 3.12 found (dify-plugin needs Python >= 3.12)."
    log "tried: \$DIFY_PYTHON, python3.12 on PATH, \$HOME/.pyenv/versions/3.12*/bin/python3.12,"
    log "/usr/bin/python3.12, /usr/local/bin/python3.12 and pyenv's 3.12 versions."
    log "install one (e.g. 'pyenv install 3.12') or point DIFY_PYTHON at it."
    exit 1
}

# Serialise concurrent builds (pytest-xdist workers, two terminals).
# The lock is taken on the requirements file itself, so no lock file is left behind.
exec 9<"$requirements"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

want="$(sha256sum "$requirements" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import importlib.util as u; assert u.find_spec("dify_plugin")' >/dev/null 2>&1; then
    log "reusing $venv"
    echo "$venv/bin/python"
    exit 0
fi

log "building $venv with $python"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
"$venv/bin/python" -c 'import dify_plugin.interfaces.model.openai_compatible.llm' >&2
# The stamp is written last, so an interrupted build is redone next time.
echo "$want" > "$stamp"
log "built $venv"
echo "$venv/bin/python"
