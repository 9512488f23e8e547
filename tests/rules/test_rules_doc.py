"""docs/rules.md's four examples (a pointwise affine op, an op that moves positions, an
activation, a gate) run as written: each explainer conserves relevance, returns the model's
logits, calls the rule's own code, and agrees layer by layer with the naive pair-by-pair
reference (tests/naive_srd.py), described here by hand from the example's model."""
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import naive_srd as N
from conftest import conservation_error, naive_agreement
from srd_fx.rules import base

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
TOL = 1e-8


def _examples():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(# rules\.md example: ([\w-]+)\n.*?)```", text, flags=re.S)
    return {name: code for code, name in blocks}


@pytest.fixture
def run_example():
    """Run an example as a module of its own (so the twin can name its functions), then restore
    the rule registry."""
    tables = [base._MODULE_RULES, base._FUNCTION_RULES, base._METHOD_RULES]
    saved = [dict(t) for t in tables]
    added = []

    def run(name):
        mod = types.ModuleType(f"rules_doc_{name.replace('-', '_')}")
        sys.modules[mod.__name__] = mod
        added.append(mod.__name__)
        torch.manual_seed(0)
        exec(compile(_examples()[name], f"docs/rules.md ({name})", "exec"), mod.__dict__)
        return mod

    yield run
    for t, s in zip(tables, saved):
        t.clear()
        t.update(s)
    for n in added:
        sys.modules.pop(n, None)


def roll_conn(shift):
    """torch.roll by ``shift`` along the width: position (h, w) goes to (h, (w + shift) mod W)."""
    def conn(hw):
        H, W = hw
        P = torch.zeros(H * W, H * W, dtype=torch.float64)
        for h in range(H):
            for w in range(W):
                P[h * W + (w + shift) % W, h * W + w] = 1.0
        return P, (H, W)
    return conn


def _relu(v):
    return torch.relu(v)


def _naive(name, ex):
    """The example's model described block by block for the naive reference."""
    m = ex.model
    head = lambda A: m.fc(A.mean((2, 3))) if hasattr(m, "fc") else m[5](A.mean((2, 3)))  # noqa: E731
    if name == "pointwise-affine":
        blocks = [N.Block("a", ["input"], lambda c, x: m[1](m[0](x)), [[N.window(3, 1, 1)]], _relu)]
    elif name == "position-moving":
        blocks = [N.Block("a", ["input"], lambda c, x: torch.roll(m.conv(x), 2, 3),
                          [[N.chain(N.window(3, 1, 1), roll_conn(2))]], _relu)]
    elif name == "activation":
        blocks = [N.Block("a1", ["input"], lambda c, x: m.conv1(x), [[N.window(3, 1, 1)]], ex.squareplus),
                  N.Block("a2", ["a1"], lambda c, x: m.conv2(x), [[N.window(3, 2, 1)]], ex.squareplus)]
    else:
        def gated(c, h):
            g = N.recorded(c, "gamma", lambda: torch.sigmoid(m.squeeze(h.mean((2, 3), keepdim=True))))
            return m.conv2(h) * g
        blocks = [N.Block("a1", ["input"], lambda c, x: m.conv1(x), [[N.window(3, 1, 1)]], _relu),
                  N.Block("a2", ["a1"], gated, [[N.window(3, 1, 1)]], _relu)]
    return N.Net(blocks, head=head)


# the rule's own function, visible in the generated code
OWN_CODE = {"pointwise-affine": "per_channel", "position-moving": "roll_back", "activation": "squareplus",
            "gate": "modulate"}


def test_the_doc_has_one_example_of_each_kind():
    assert sorted(_examples()) == sorted(OWN_CODE)


@pytest.mark.parametrize("name", sorted(OWN_CODE))
def test_rules_doc_example(name, run_example):
    ex = run_example(name)
    assert conservation_error(ex.out) <= 1e-10          # the example's own run
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    net = _naive(name, ex)
    with torch.no_grad():
        torch.testing.assert_close(net.head(N.encoder_output(net, x)), ex.model(x), rtol=1e-12, atol=1e-12)
    L = N.encoder_output(net, x)
    R_L = torch.rand(x.shape[0], *L.shape[-2:], dtype=torch.float64) + 0.1
    out, _ = naive_agreement(ex.model, net, x, R_L, TOL, example_input=x[:1])
    assert conservation_error(out) <= 1e-10
    with torch.no_grad():
        assert torch.equal(out.logits, ex.model(x))
    import srd_fx
    assert OWN_CODE[name] in srd_fx.compile(ex.model, example_input=x[:1]).code


def test_without_the_rule_the_op_is_refused(run_example):
    """The examples are needed: without its rule, the roll is not a known op."""
    ex = run_example("position-moving")
    import srd_fx
    del base._FUNCTION_RULES[torch.roll]
    with pytest.raises(srd_fx.UnsupportedOpError, match="roll"):
        srd_fx.compile(ex.model, example_input=torch.randn(1, 3, 8, 8, dtype=torch.float64))
