"""Every Python code block of README.md and docs/*.md runs as shown.

Each block runs on its own, in a fresh namespace and an empty working directory, so it must define
everything it uses.  A block that needs network weights or a long run is marked on the line before
it with ``<!-- doc-test: skip (the reason) -->`` and reported as skipped with that reason.  (Shell
blocks are commands of the ``srd-fx`` tool, whose options tests/test_cli.py checks.)"""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s*\((.+)\)\s*-->")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    out = []
    for path in ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))):
        text = open(os.path.join(REPO, path), encoding="utf-8").read()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.search(before)
            out.append(pytest.param(m.group(1), skip.group(1) if skip else None, id=f"{path}:{line}"))
    return out


BLOCKS = _blocks()


def test_the_docs_have_python_blocks_and_most_run():
    assert len(BLOCKS) >= 8
    assert sum(p.values[1] is None for p in BLOCKS) > sum(p.values[1] is not None for p in BLOCKS)


@pytest.mark.parametrize("code, skip", BLOCKS)
def test_python_block_runs(code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    import matplotlib
    matplotlib.use("Agg")
    import torch
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
