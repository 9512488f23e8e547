"""MkDocs hooks of the srd_fx documentation (``hooks:`` in mkdocs.yml).

* Links from a guide to a file of the repository outside ``docs/`` (``../results/fig_maps.png``,
  ``../model_zoo_checks/REPORT.md``) are served from a ``repo/`` folder of the site, so that they work
  in the built site; a link to a file that does not exist is left alone, and MkDocs reports it (a
  warning, so ``mkdocs build --strict`` fails).
* The API reference is checked: every object named by a ``::: identifier`` line of ``docs/api/`` and
  every public member it shows must have a docstring, and every function or method must document
  each of its parameters in a NumPy-style ``Parameters`` section (a class documents its constructor's
  parameters).  Each gap is a warning, so the strict build fails on it.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.plugins.srd_fx")
LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.M)
#: Rule methods are callbacks of the compiler with one fixed signature ``(b, node, ...)``, described
#: once by the rule contract (the ``Rule`` class docstring): they need a docstring, not a Parameters
#: section each.
PARAMETERS_EXEMPT = ("srd_fx.rules.",)


def _repo_root(config) -> str:
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _resolve(src_uri: str, link: str, root: str, docs_dir: str):
    """Where a relative link of page ``src_uri`` points in the site, when that needs a rewrite:
    ``("repo/PATH", PATH)`` for an existing repository file outside docs/, ``(DOC, None)`` for a
    guide linked from a copied repository file; None to leave the link alone (MkDocs validates it)."""
    if "://" in link or link.startswith(("/", "mailto:")):
        return None
    base = os.path.join(root, os.path.dirname(src_uri[5:])) if src_uri.startswith("repo/") else \
        os.path.join(docs_dir, os.path.dirname(src_uri))
    target = os.path.normpath(os.path.join(base, link))
    if os.path.commonpath([target, root]) != root or not os.path.isfile(target):
        return None
    if os.path.commonpath([target, docs_dir]) == docs_dir:
        if not src_uri.startswith("repo/"):
            return None
        return os.path.relpath(target, docs_dir).replace(os.sep, "/"), None
    rel = os.path.relpath(target, root).replace(os.sep, "/")
    return "repo/" + rel, rel


def on_files(files, config):
    root, docs_dir = _repo_root(config), os.path.abspath(config["docs_dir"])
    copied = set()
    todo = [(f.src_uri, f.abs_src_path) for f in files.documentation_pages()]
    while todo:  # a copied markdown file is a page too: its own links are followed in turn
        src_uri, path = todo.pop()
        for _, link, _ in LINK.findall(open(path, encoding="utf-8").read()):
            hit = _resolve(src_uri, link, root, docs_dir)
            if hit is None or hit[1] is None or hit[1] in copied:
                continue
            rel = hit[1]
            copied.add(rel)
            files.append(File.generated(config, "repo/" + rel, abs_src_path=os.path.join(root, rel)))
            if rel.endswith(".md"):
                todo.append(("repo/" + rel, os.path.join(root, rel)))
    return files


def on_page_markdown(markdown, page, config, files):
    root, docs_dir = _repo_root(config), os.path.abspath(config["docs_dir"])

    def fix(m):
        hit = _resolve(page.file.src_uri, m.group(2), root, docs_dir)
        if hit is None:
            return m.group(0)
        return m.group(1) + posixpath.relpath(hit[0], posixpath.dirname(page.file.src_uri) or ".") + m.group(3)
    return LINK.sub(fix, markdown)


# ------------------------------------------------------------------------------ API docstring check
def _documented(obj) -> set:
    if obj.docstring is None:
        return set()
    names = set()
    for section in obj.docstring.parse("numpy"):
        if section.kind.value in ("parameters", "other parameters", "attributes"):
            names |= {p.name.lstrip("*") for p in section.value}
    return names


def _check_params(obj, where: str, problems: list) -> None:
    params = [p for p in obj.parameters if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.name not in _documented(obj)]
    if missing:
        problems.append(f"{where}: parameters not documented (NumPy 'Parameters' section): {', '.join(missing)}")


def _check(obj, problems: list, seen: set, depth: int = 0) -> None:
    obj = obj.final_target if obj.is_alias else obj
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.is_module:
        if obj.exports is not None:
            names = [n if isinstance(n, str) else n.name for n in obj.exports]
        else:  # no __all__: what the module defines itself
            names = [n for n, m in obj.members.items() if not n.startswith("_") and not m.is_alias]
        for name in names:
            member = obj.members.get(name)
            try:
                wanted = member is not None and (member.is_function or member.is_class)
            except Exception:  # an alias to another package (torch, typing)
                wanted = False
            if wanted:
                _check(member, problems, seen, depth + 1)
        return
    if not (obj.docstring and obj.docstring.value.strip()):
        problems.append(f"{obj.path}: no docstring")
        return
    if obj.is_function:
        _check_params(obj, obj.path, problems)
    elif obj.is_class:
        init = obj.members.get("__init__")
        if init is not None and not init.is_alias and init.is_function:
            params = [p for p in init.parameters if p.name not in ("self", "cls")]
            missing = [p.name for p in params if p.name not in (_documented(obj) | _documented(init))]
            if missing:
                problems.append(f"{obj.path}: constructor parameters not documented: {', '.join(missing)}")
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or member.is_class:
                continue
            is_property = member.is_attribute and "property" in member.labels
            if member.is_function or is_property:
                if not (member.docstring and member.docstring.value.strip()):
                    problems.append(f"{member.path}: no docstring")
                elif member.is_function and name != "forward" and not member.path.startswith(PARAMETERS_EXEMPT):
                    _check_params(member, member.path, problems)


def on_pre_build(config):
    import griffe
    root = _repo_root(config)
    api_dir = os.path.join(os.path.abspath(config["docs_dir"]), "api")
    idents = []
    for fname in sorted(os.listdir(api_dir)) if os.path.isdir(api_dir) else []:
        if fname.endswith(".md"):
            idents += DIRECTIVE.findall(open(os.path.join(api_dir, fname), encoding="utf-8").read())
    loader = griffe.GriffeLoader(search_paths=[root], docstring_parser="numpy")
    pkg = loader.load("srd_fx")
    loader.resolve_aliases(implicit=False, external=False)
    problems, seen = [], set()
    for ident in idents:
        obj = pkg
        for part in ident.split(".")[1:]:
            obj = obj[part]
        _check(obj, problems, seen)
    for p in problems:
        log.warning("API reference: %s", p)


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc):(<code>)")


def on_page_content(html, page, config, files):
    """Docstrings written with Sphinx roles (``:func:`name```) render as plain code in the reference."""
    return _ROLE.sub(r"\1", html)
