#!/usr/bin/env bash
# The package as users install it: builds the wheel, installs it (and its [dev] extra) into
# an empty venv outside the checkout, and runs it from another directory: `python -m
# copycat_tf`, --version, every verb's --help as a console script and as a module, then
# copycat-demo --quick on a tiny generated dataset, its queries chosen in rounds (so its
# candidates made by the installed package's NPD worker processes). Run by `make test` (so
# by CI).
#   bash scripts/package_smoke.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "package smoke: building the wheel" >&2
"$python" -m pip wheel --no-deps --quiet --disable-pip-version-check -w dist "$repo" 2>/dev/null
wheel="$(ls dist/copycat_tf-*.whl)"
"$python" -m venv venv
pip="venv/bin/python -m pip --disable-pip-version-check --quiet"
echo "package smoke: installing $(basename "$wheel")[dev] into an empty venv" >&2
# The pinned lock keeps the install to versions CI tests; the wheel itself only states ranges.
$pip install "${wheel}[dev]" -c "$repo/requirements-dev.txt" 2>/dev/null
venv/bin/pytest --version >/dev/null
venv/bin/ruff --version >/dev/null

# Outputs are captured before grep reads them: `cmd | grep -q` may close the pipe early.
verbs=$(venv/bin/python -m copycat_tf)
grep -q "steal" <<<"$verbs"
version=$(venv/bin/python -m copycat_tf --version)
grep -q "^copycat_tf [0-9]" <<<"$version"
version=$(venv/bin/copycat-steal --version)
grep -q "^copycat_tf [0-9]" <<<"$version"
for verb in train_target model_server steal train_copycat evaluate demo study; do
  script="copycat-${verb//_/-}"
  for command in "venv/bin/$script" "venv/bin/python -m copycat_tf.$verb"; do
    help="$($command --help 2>&1 || true)"  # absl exits 1 after --help
    { grep -q -- "^  --" <<<"$help" && grep -q "(default: " <<<"$help"; } \
      || { echo "$command --help: $help" >&2; exit 1; }
  done
done

# Apache Beam is an optional extra: without it, steal --runner says how to install it.
runner_err="$(venv/bin/copycat-steal --runner=DirectRunner --target=savedmodel:none \
  --npd=synthetic:noise --query_budget=1 --output_dir="$work/beam" 2>&1 || true)"
grep -q "^copycat-steal: error: --runner needs Apache Beam .*requirements-beam.txt" <<<"$runner_err" \
  || { echo "copycat-steal --runner without Beam: $runner_err" >&2; exit 1; }

echo "package smoke: copycat-demo --quick on a tiny dataset, from $work" >&2
venv/bin/python - <<PY
import sys
sys.path.insert(0, "$repo/tests")
from conftest import write_fashion_idx
write_fashion_idx("$work/fashion")
PY
venv/bin/copycat-demo --quick --data_dir="$work/fashion" --npd=synthetic:shapes --selection=entropy \
  --query_budget=200 --epochs=1 --eval_examples=40 --workdir=demo > demo.txt 2> demo.err \
  || { tail -20 demo.err >&2; exit 1; }
grep -q "agreement with target" demo.txt
test -f demo/eval/report.json
echo "package smoke: ok" >&2
