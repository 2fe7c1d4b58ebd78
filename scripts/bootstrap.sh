#!/usr/bin/env bash
# Create .venv with Python 3.11, install the pinned dependencies, then the
# project's own package (myapp, editable, without dependencies).
# Usage: scripts/bootstrap.sh [runtime|dev]
#   runtime: requirements.txt (the service) + requirements-run.txt (the embedded
#            servers of the run command); dev adds requirements-dev.txt (test
#            and benchmark tools).
# Re-running is cheap: pip runs only when a requirements file or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:-runtime}
files=(requirements.txt requirements-run.txt)
[ "$kind" = dev ] && files+=(requirements-dev.txt)

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed-$kind
digest=$(cat "${files[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "bootstrap: installing ${files[*]} into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "${files[-1]}"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$digest" > "$stamp"
fi
