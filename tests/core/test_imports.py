"""The packages' import graph has no cycle: every ``import`` of srd_fx and model_zoo_checks, at
module level or inside a function, read from the source with ``ast``, points one way."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("srd_fx", "model_zoo_checks")


def _modules():
    """Dotted module name -> source file, for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported_names(name, path):
    """Dotted names that module ``name`` imports (``from a import b`` gives ``a.b``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            else:
                base = [node.module]
            yield from (".".join(base + [a.name]) for a in node.names)


def import_graph():
    mods = _modules()

    def owner(dotted):  # the longest module prefix of a dotted name (a module, or the package)
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for target in _imported_names(name, path):
            t = owner(target)
            if t is not None and t != name:
                g.add_edge(name, t)
    return g


def test_the_graph_sees_the_packages():
    g = import_graph()
    # the reader resolves relative and absolute imports (a graph with no edges has no cycle either)
    assert g.has_edge("srd_fx.compiler.analysis", "srd_fx.rules")
    assert g.has_edge("srd_fx.rules.conv", "srd_fx.compiler.runtime")
    assert g.has_edge("model_zoo_checks.cli", "model_zoo_checks.runner")
    assert g.number_of_nodes() > 40


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])
