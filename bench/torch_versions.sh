#!/usr/bin/env bash
# The suite on one torch release, as a careful user would run it: a fresh venv, the test
# requirements installed with that torch pinned, then pytest from the repository root.
#
#   bench/torch_versions.sh 2.9.1              # the whole suite on torch 2.9.1
#   bench/torch_versions.sh 2.15.0 -x tests/test_parallel.py   # extra arguments go to pytest
#
# The venv is $TORCH_VENVS/torch-VERSION (default ${TMPDIR:-/tmp}/lion_min-torch), rebuilt from
# nothing on every run. Releases other than the CPU build pinned in the README come from PyPI as
# CUDA builds (several GB each; pip's cache keeps them for the next run). Python: $PYTHON
# (default python3, >= 3.11). The first lines printed are the date, the versions and the command.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bench/torch_versions.sh TORCH_VERSION [pytest arguments...]" >&2
    exit 2
fi
version="$1"
shift
cd "$(dirname "$0")/.."
venv="${TORCH_VENVS:-${TMPDIR:-/tmp}/lion_min-torch}/torch-$version"

"${PYTHON:-python3}" -m venv --clear "$venv"
. "$venv/bin/activate"
pip install -q "torch==$version" -r requirements-test.txt

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), lion_min $(git describe --always --dirty 2>/dev/null || echo '(not a git checkout)')"
python - <<'EOF'
import platform, setuptools, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, setuptools {setuptools.__version__}")
EOF
echo "command: python -m pytest -q $*"
start=$SECONDS
status=0
python -m pytest -q "$@" || status=$?
echo "torch $version: pytest exit $status in $((SECONDS - start)) s"
exit $status
