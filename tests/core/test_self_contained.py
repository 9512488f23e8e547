"""The repository is self-contained: no tracked file refers to anything outside it (a sibling
``shared`` folder, an absolute path of the machine it was developed on).  The method the project
implements is described in docs/method.md, in the repository."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# written in pieces so that this file does not match itself
OUTSIDE = re.compile("|".join([
    r"\.\./" + "shared",                       # a sibling folder of the checkout
    r"(?<![\w.~-])/" + "work/",                # absolute paths of the development machine
    r"(?<![\w.-])" + "shared/" + r"(SPEC|paper)",
]))


def tracked_files():
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the tracked files")
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if r.returncode != 0 or not r.stdout:
        pytest.skip("not a git checkout (e.g. an installed sdist): no tracked files to check")
    return [p for p in r.stdout.decode().split("\0") if p]


def test_no_tracked_file_refers_outside_the_repository():
    bad = []
    for path in tracked_files():
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue                             # deleted in the working tree
        with open(full, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        for no, line in enumerate(text.splitlines(), 1):
            m = OUTSIDE.search(line)
            if m:
                bad.append(f"{path}:{no}: {line.strip()[:120]}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad[:40]) + (
        f"\n... and {len(bad) - 40} more" if len(bad) > 40 else "")


def test_the_pattern_catches_what_it_must():
    for s in ["see [SPEC](../" "shar" "ed/SPEC.md)", "cache at /" "work/venv/lib", '"/' 'work/x"',
              "shar" "ed/" "paper/x.txt"]:
        assert OUTSIDE.search(s), s
    for s in ["docs/method.md", "https://example.org/work/x", "src/work/y", "~/work/z"]:
        assert not OUTSIDE.search(s), s


def test_the_method_page_exists_and_the_readme_links_it():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "docs/method.md" in readme
    assert os.path.isfile(os.path.join(ROOT, "docs", "method.md"))
