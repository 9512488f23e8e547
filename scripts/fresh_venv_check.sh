#!/usr/bin/env bash
# Fresh-clone check of README.md's set-up: `git clone` the repository into a temporary folder, then
# run the two ```bash blocks of README.md's "## Set-up" section there, one after the other, each
# timed (they make their own virtual environment, .venv, in the clone). The commands are read from
# the README each time, so this check follows the README.
#
# usage: scripts/fresh_venv_check.sh [options]
#   --source DIR   repository to clone (default: the one holding this script)
#   --worktree     also carry the source's uncommitted changes and untracked (not ignored) files
#                  into the clone (to check work before it is committed; reads git, changes nothing)
#   --readme FILE  take the commands from FILE's "## Set-up" section instead of the clone's README.md
#   --only N       run only the N-th command (1 or 2)
#   --cache DIR    SRD_FX_CACHE for the commands (default: a new empty folder, as on a fresh machine)
#   --keep         keep the temporary folder (default: removed at the end when everything passed)
#   --dry-run      clone and print the commands, run nothing
#
# Needs python3 (the README's interpreter) and access to a package index (PyPI, a mirror, or
# PIP_FIND_LINKS). Takes minutes: pip installs torch, and the demo trains its model on a cold cache.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
src="$here"; worktree=0; readme=""; only=""; cache=""; keep=0; dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --source) src="$(cd "$2" && pwd)"; shift 2 ;;
    --worktree) worktree=1; shift ;;
    --readme) readme="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "fresh_venv_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

tmp="$(mktemp -d "${TMPDIR:-/tmp}/srd_fx_fresh.XXXXXX")"
clone="$tmp/srd_fx"
echo "fresh_venv_check: cloning $src into $clone"
git clone --quiet "$src" "$clone"
if [ "$worktree" = 1 ]; then
  git -C "$src" diff --binary HEAD > "$tmp/worktree.patch"
  if [ -s "$tmp/worktree.patch" ]; then git -C "$clone" apply --whitespace=nowarn "$tmp/worktree.patch"; fi
  git -C "$src" ls-files -z --others --exclude-standard | tar -C "$src" --null -T - -cf - | tar -C "$clone" -xf -
  echo "fresh_venv_check: carried the working tree's changes ($(wc -l < "$tmp/worktree.patch") patch lines, untracked files)"
fi
readme="${readme:-$clone/README.md}"

# the ```bash blocks of the "## Set-up" section, one file each
python3 - "$readme" "$tmp" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
m = re.search(r"^##\s+Set-up\s*$(.*?)(?=^##\s|\Z)", text, flags=re.M | re.S)
if not m:
    sys.exit(f"fresh_venv_check: {sys.argv[1]} has no '## Set-up' section")
blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```", m.group(1), flags=re.M | re.S)
if len(blocks) < 2:
    sys.exit(f"fresh_venv_check: the Set-up section has {len(blocks)} ```bash block(s), expected 2")
for i, b in enumerate(blocks[:2], 1):
    open(f"{sys.argv[2]}/command{i}.sh", "w").write(b)
PY

if [ "$dry" = 1 ]; then
  for i in 1 2; do echo "fresh_venv_check: command $i:"; sed 's/^/    /' "$tmp/command$i.sh"; done
  rm -rf "$tmp"; exit 0
fi
export SRD_FX_CACHE="${cache:-$tmp/cache}"
export MPLBACKEND=Agg
mkdir -p "$SRD_FX_CACHE"
echo "fresh_venv_check: $(python3 --version), $(nproc) CPU cores, SRD_FX_CACHE=$SRD_FX_CACHE"
status=0; total=0
for i in 1 2; do
  if [ -n "$only" ] && [ "$only" != "$i" ]; then continue; fi
  echo "fresh_venv_check: command $i:"; sed 's/^/    /' "$tmp/command$i.sh"
  t0=$(date +%s.%N)
  set +e
  (cd "$clone" && bash -euo pipefail "$tmp/command$i.sh") > "$tmp/command$i.log" 2>&1
  rc=$?
  set -e
  dt=$(python3 -c "print(round($(date +%s.%N) - $t0))")
  total=$((total + dt))
  tail -n 25 "$tmp/command$i.log" | sed 's/^/    | /'
  if [ $rc -eq 0 ]; then res=ok; else res="FAILED (exit $rc)"; status=1; fi
  echo "fresh_venv_check: command $i: $res in ${dt} s (log: $tmp/command$i.log)"
done
echo "fresh_venv_check: total ${total} s, $( [ $status -eq 0 ] && echo 'all passed' || echo 'FAILURES')"
if [ $status -eq 0 ] && [ "$keep" = 0 ]; then rm -rf "$tmp"; else echo "fresh_venv_check: kept $tmp"; fi
exit $status
