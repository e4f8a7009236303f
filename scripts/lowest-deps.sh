#!/usr/bin/env bash
# Install the LOWEST supported version of every dependency (the `>=` bounds in pyproject.toml, pinned with
# `==`) in a fresh venv, then run a quick test subset: proves the lower bounds are real.
#
#   scripts/lowest-deps.sh [VENV_DIR]          # default VENV_DIR: .venv-lowest
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/lowest-deps.sh   # CPU torch wheels (smaller)
#   TESTS="tests/test_architecture.py" scripts/lowest-deps.sh                  # another subset
#
# Uses `uv pip install --resolution lowest-direct` when uv is on PATH, else pip with a constraints file
# generated from pyproject.toml. Needs network access to PyPI; the download is large (torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-lowest}"
PY="${PYTHON:-python3}"
TESTS="${TESTS:-tests/test_architecture.py tests/test_cli_conventions.py tests/compression/test_recipe.py tests/compression/test_recipe_compact.py tests/search/test_study_metadata.py}"

"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
EXTRA=()
if [[ -n "${TORCH_INDEX:-}" ]]; then EXTRA+=(--extra-index-url "$TORCH_INDEX"); fi

CONSTRAINTS="$VENV/lowest-constraints.txt"
# every "name>=X" requirement of [project] dependencies and the demo/test extras -> "name==X"
"$VPY" - "$CONSTRAINTS" <<'EOF'
import re, sys, tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = proj["dependencies"] + proj["optional-dependencies"]["demo"] + proj["optional-dependencies"]["test"]
pins = []
for r in reqs:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)", r)
    if m:
        pins.append(f"{m.group(1)}=={m.group(2)}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("pinned:", " ".join(pins))
EOF

if command -v uv >/dev/null 2>&1; then
  uv pip install --python "$VPY" --resolution lowest-direct "${EXTRA[@]}" -e ".[test]"
else
  "$VPY" -m pip install --upgrade pip
  "$VPY" -m pip install "${EXTRA[@]}" -c "$CONSTRAINTS" -e ".[test]"
fi
"$VPY" -m pip freeze > "$VENV/lowest-freeze.txt"
echo "installed versions: $VENV/lowest-freeze.txt"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$VPY" -m pytest -x -q -m "not slow" $TESTS
