#!/usr/bin/env bash
# CI: check the artefact, not the checkout.  Build the sdist and the wheel, install the wheel into a
# fresh virtual environment outside the repository and smoke-test it there: first the wheel alone
# (plus torch/torchvision), then with its `eval` extra.  Usage: .ci/wheel_check.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${1:-python3}
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac  # absolute: we cd below
work=$(mktemp -d "${TMPDIR:-/tmp}/srd_fx_wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
export MPLBACKEND=Agg

t0=$(date +%s)
"$py" -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
rm -rf "$repo/build" "$repo"/*.egg-info
wheel=$(ls "$work"/dist/srd_fx-*.whl)
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) and $(basename "$(ls "$work"/dist/*.tar.gz)")"

# The wheel holds the package, its rules, the zoo runner and its CI list, the bundled photo and py.typed,
# and nothing else (no tests, results, benchmarks, docs).
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for need in ("srd_fx/__init__.py", "srd_fx/py.typed", "srd_fx/data/chelsea.jpg", "srd_fx/rules/conv.py",
             "srd_fx/compiler/twin.py", "srd_fx/cli/commands/explain.py", "model_zoo_checks/ci_subset.txt",
             "model_zoo_checks/runner.py"):
    assert need in names, f"{need} is missing from the wheel"
tops = {n.split("/")[0] for n in names}
assert tops <= {"srd_fx", "model_zoo_checks"} | {t for t in tops if t.endswith(".dist-info")}, tops
bad = [n for n in names if n.startswith(("tests/", "results/", "benchmarks/", "experiments/", "docs/"))
       or n.endswith(("REPORT.md", "report.json", "peers.json"))]
assert not bad, bad
print(f"wheel: {len(names)} files, top level {sorted(tops)}")
PY

pip_q() {  # pip, quiet, without the local index's "Location ... is ignored" noise
    venv/bin/pip install -q "$@" 2> "$work/pip.err" || { cat "$work/pip.err" >&2; return 1; }
    grep -v "is ignored: it is neither a file nor a directory" "$work/pip.err" >&2 || true
}
cd "$work"   # nothing of the repository is importable from here
"$py" -m venv venv
pip_q torch==2.14.1 torchvision==0.29.1
pip_q "$wheel"
venv/bin/python "$repo/.ci/wheel_smoke.py" core
pip_q "$wheel[eval]"
venv/bin/python "$repo/.ci/wheel_smoke.py" eval
echo "wheel check passed in $(( $(date +%s) - t0 )) s"
