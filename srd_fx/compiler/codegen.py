"""How the twin reads as Python: ``print(explainer.code)``.

torch.fx writes the code; :class:`SRDCodeGen` then edits its text, not its meaning:

* every function of ``srd_fx`` that the code calls is reached through one name, ``srd``
  (``srd.sharing``, ``srd.conv_T``, ``srd.gradcam``), instead of fx's mangled module paths;
* a comment line opens the forward pass, the head, every block's backward
  (``# block: layer4.1.act2 <- layer4.0.act2, layer4.1.act1``) and the outputs;
* no line is longer than :data:`MAX_LINE` characters: the ``x = y = None`` statements that free
  tensors early go to a line of their own, and long calls are wrapped at their arguments.
"""
from __future__ import annotations

import re
import types
from typing import Dict, List

import torch.fx as fx

MAX_LINE = 150


class SRDCodeGen(fx.graph.CodeGen):
    """fx's code generator, with the edits above.  ``comments``: node name -> comment lines to
    put before the line that computes the node."""

    def __init__(self, comments: Dict[str, List[str]]):
        super().__init__()
        self.comments = comments

    def _gen_python_code(self, nodes, root_module, namespace, **kwargs):
        pc = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        src, srd = _one_namespace(pc.src, pc.globals)
        pc.globals["srd"] = srd
        pc.src, pc._lineno_map = _layout(src, self.comments, pc._lineno_map, pc._prologue_start)
        return pc


def _one_namespace(src: str, globals_: dict):
    """Rename fx's globals for srd_fx functions (``srd_fx_compiler_runtime_sharing``) to
    attributes of one namespace object (``srd.sharing``)."""
    ours = {name: obj for name, obj in globals_.items()
            if callable(obj) and str(getattr(obj, "__module__", "")).startswith("srd_fx")}
    short: Dict[str, object] = {}
    rename = {}
    for name, obj in sorted(ours.items()):
        attr = obj.__name__
        if attr in short and short[attr] is not obj:  # two srd_fx functions of the same name
            attr = f"{obj.__module__.rsplit('.', 1)[-1]}_{attr}"
        short[attr] = obj
        rename[name] = "srd." + attr
    if rename:
        pat = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
        src = pat.sub(lambda m: rename[m.group(1)], src)
    return src, types.SimpleNamespace(**short)


def _split_args(text: str) -> List[str]:
    """Split the text between a call's parentheses at its top-level commas (strings respected)."""
    parts, depth, quote, cur = [], 0, None, []
    i = 0
    while i < len(text):
        c = text[i]
        cur.append(c)
        if quote:
            if c == "\\":
                cur.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append("".join(cur[:-1]).strip())
            cur = []
        i += 1
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _wrap(line: str) -> List[str]:
    """One statement as lines of at most MAX_LINE characters where it can be done."""
    if len(line) <= MAX_LINE:
        return [line]
    indent = line[:len(line) - len(line.lstrip())]
    stmt = line.strip()
    if ";  " in stmt:  # `y = f(x);  a = b = None`: the frees get their own line(s)
        head, _, free = stmt.partition(";  ")
        out = _wrap(indent + head)
        names = [n.strip() for n in free.split("=")[:-1]]
        row: List[str] = []
        for n in names:
            if row and len(indent) + len(" = ".join(row + [n])) + 7 > MAX_LINE:
                out.append(indent + " = ".join(row) + " = None")
                row = []
            row.append(n)
        out.append(indent + " = ".join(row) + " = None")
        return out
    m = re.match(r"^([\w.]+ = )?([\w.\[\]\"']+)\((.*)\)$", stmt)
    if not m:
        return [line]
    lhs, fn, inner = m.group(1) or "", m.group(2), m.group(3)
    args = _split_args(inner)
    out, cur = [], indent + lhs + fn + "("
    cont = indent + " " * 8
    for k, a in enumerate(args):
        piece = a + (", " if k < len(args) - 1 else ")")
        if len(cur) + len(piece) > MAX_LINE and cur.strip() and not cur.endswith("("):
            out.append(cur.rstrip())
            cur = cont
        cur += piece
    out.append(cur)
    return out


def _layout(src: str, comments: Dict[str, List[str]], lineno_map, prologue_start: int):
    """Insert the comment lines and wrap long ones; keep fx's line -> node map in step."""
    lines = src.split("\n")
    out: List[str] = []
    new_map = {} if lineno_map is not None else None
    for i, line in enumerate(lines):
        m = re.match(r"^    (\w+) = ", line)
        if m and m.group(1) in comments:
            for c in comments[m.group(1)]:
                out.append("    # " + c)
        for piece in _wrap(line):
            if new_map is not None and (i - prologue_start) in lineno_map:
                new_map[len(out) - prologue_start] = lineno_map[i - prologue_start]
            out.append(piece)
    return "\n".join(out), new_map
