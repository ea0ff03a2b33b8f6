"""The package's import rules (docs/design.md, "Layers"), checked on the source.

Every module under ``thinpool/`` is parsed with :mod:`ast`; nothing is imported or executed.  The
import graph has one edge per ``import`` / ``from ... import`` naming a thinpool module, absolute or
relative, at module level or inside a function (a lazy import runs too, only later).  Imports under
``if TYPE_CHECKING:`` are annotations only: they count for the layer rules, not for cycles.

The rules:

* the base (``errors``, ``units``) imports nothing else of thinpool;
* the engine (every top-level module of ``thinpool``) never imports a front end (``interop/``,
  ``containers/``, ``control/``, ``nbd/``, ``simulate/``, ``cli/``, ``__main__``);
* ``interop/`` works over its IR only: besides itself it may import the base and the helpers in
  :data:`INTEROP_MAY_IMPORT`, never the pool;
* only ``cli/`` (and ``python -m thinpool``) imports ``cli/``: the CLI is the outermost layer;
* no import cycles, at any level, except those listed in :data:`ALLOWED_CYCLES` with a reason;
* no ``_private`` name of a module is used outside that module's package (``from X import _y``,
  ``X._y`` through an imported module, or importing a ``_private`` module); and the front ends never
  touch the engine's private members listed in :data:`ENGINE_PRIVATE_MEMBERS` on any object.

Each failure names the file and line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PKG = "thinpool"
ROOT = Path(__file__).resolve().parent.parent / PKG

#: errors.py and units.py: the base every layer may use; they import only each other
BASE = {"thinpool.errors", "thinpool.units"}

#: the front-end packages (plus the ``python -m thinpool`` entry point)
FRONT_ENDS = ("thinpool.interop", "thinpool.containers", "thinpool.control", "thinpool.nbd", "thinpool.cli",
              "thinpool.simulate", "thinpool.__main__")

#: front-end modules the engine may import, with the reason; each must import only the base
ENGINE_MAY_IMPORT = {
    "thinpool.interop.ir": "the IR is a plain data model (dataclasses over numpy arrays) that the engine's "
                           "bridge (pool_ir.py) produces and consumes; it imports nothing of thinpool",
}

#: what interop/ may import besides itself and the base, with the reason
INTEROP_MAY_IMPORT = {
    "thinpool.safe_output": "the exporters write user-named files through the one output-path guard",
}

#: import cycles that are allowed, as frozensets of modules -> the reason (none today)
ALLOWED_CYCLES: dict[frozenset[str], str] = {}

#: private members of the engine's objects (Pool, Thin, DeviceTable) a front end must never use, on any
#: object: a front end goes through the public interface (e.g. ``pool.locked()``)
ENGINE_PRIVATE_MEMBERS = {"_lock", "_register", "_slot", "_kernel_table", "_one_io", "_after_alloc",
                          "_by_name", "_check_open", "_check_writable", "_new_slot", "_install"}


# ---------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Edge:
    """One import of a thinpool module by another."""

    src: str
    dst: str
    path: str
    line: int
    lazy: bool            # inside a function body
    type_only: bool       # under ``if TYPE_CHECKING:``

    def where(self) -> str:
        kind = " (type-checking only)" if self.type_only else " (inside a function)" if self.lazy else ""
        return f"{self.path}:{self.line}: {self.src} imports {self.dst}{kind}"


@dataclass
class Graph:
    """Modules (name -> file), import edges and private-name uses found in the source."""

    modules: dict[str, Path] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)
    edges: list[Edge] = field(default_factory=list)
    private_uses: list[tuple[str, str, int, str, str]] = field(default_factory=list)  # src, path, line, owner, name
    member_uses: list[tuple[str, str, int, str]] = field(default_factory=list)        # src, path, line, attr


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """``thinpool/a/b.py`` -> (``thinpool.a.b``, False); ``thinpool/a/__init__.py`` -> (``thinpool.a``, True)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_of(mod: str, graph: Graph) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    return mod if mod in graph.packages else mod.rpartition(".")[0]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Scanner(ast.NodeVisitor):
    def __init__(self, graph: Graph, mod: str, is_pkg: bool, path: Path, root: Path) -> None:
        self.g, self.mod, self.is_pkg = graph, mod, is_pkg
        self.path = str(path.relative_to(root.parent))
        self.depth = 0            # function nesting
        self.type_only = 0        # TYPE_CHECKING nesting
        self.bound: dict[str, str] = {}   # local name -> thinpool module it names

    # -- context
    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_only += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_only -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    # -- imports
    def _edge(self, dst: str, line: int) -> None:
        self.g.edges.append(Edge(self.mod, dst, self.path, line, self.depth > 0, self.type_only > 0))

    def _known(self, name: str) -> bool:
        return name in self.g.modules

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != PKG:
                continue
            if self._known(alias.name):
                self._edge(alias.name, node.lineno)
                self._private_module(alias.name, node.lineno)
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:
                self.bound[PKG] = PKG

    def _resolve_from(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        base = self.mod.split(".")
        if not self.is_pkg:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        return ".".join(base + ([node.module] if node.module else []))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve_from(node)
        if not base or base.split(".")[0] != PKG:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if self._known(sub):
                self._edge(sub, node.lineno)
                self._private_module(sub, node.lineno)
                self.bound[alias.asname or alias.name] = sub
            elif self._known(base):
                self._edge(base, node.lineno)
                if is_private(alias.name):
                    self._private(base, alias.name, node.lineno)

    # -- private names
    def _private(self, owner: str, name: str, line: int) -> None:
        if package_of(owner, self.g) != package_of(self.mod, self.g):
            self.g.private_uses.append((self.mod, self.path, line, owner, name))

    def _private_module(self, mod: str, line: int) -> None:
        last = mod.rpartition(".")[2]
        if is_private(last):
            self._private(mod.rpartition(".")[0], last, line)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, cur = [node.attr], node.value
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name):
            chain.reverse()
            target = self.bound.get(cur.id)
            if target is not None:  # walk a dotted module path: thinpool.pool._x, K._y
                for i, name in enumerate(chain):
                    if self._known(f"{target}.{name}"):
                        target = f"{target}.{name}"
                        continue
                    if is_private(name):
                        self._private(target, name, node.lineno)
                    break
            elif node.attr in ENGINE_PRIVATE_MEMBERS and not (len(chain) == 1 and cur.id in ("self", "cls")):
                self.g.member_uses.append((self.mod, self.path, node.lineno, node.attr))
        elif node.attr in ENGINE_PRIVATE_MEMBERS:
            self.g.member_uses.append((self.mod, self.path, node.lineno, node.attr))
        self.generic_visit(node)


def build_graph(root: Path = ROOT) -> Graph:
    """Parse every module under *root* (the thinpool package directory); no import is executed."""
    g = Graph()
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        name, is_pkg = module_name(path, root)
        g.modules[name] = path
        if is_pkg:
            g.packages.add(name)
    for name, path in list(g.modules.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        _Scanner(g, name, name in g.packages, path, root).visit(tree)
    return g


GRAPH = build_graph()


def is_front_end(mod: str) -> bool:
    return any(mod == f or mod.startswith(f + ".") for f in FRONT_ENDS)


def is_engine(mod: str) -> bool:
    """Top-level modules of thinpool (and the package itself, the public API), the base excluded."""
    return mod not in BASE and not is_front_end(mod) and (mod == PKG or mod.count(".") == 1)


def _fail(problems: list[str], rule: str) -> None:
    if problems:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(sorted(set(problems))), pytrace=False)


# ---------------------------------------------------------------------------------------- the rules
def test_the_graph_is_not_empty():
    """Guard against a scanner that finds nothing (every rule below would then pass vacuously)."""
    assert {"thinpool.pool", "thinpool.errors", "thinpool.cli"} <= set(GRAPH.modules)
    assert any(e.src == "thinpool.pool" and e.dst == "thinpool.errors" for e in GRAPH.edges)
    assert sum(is_engine(m) for m in GRAPH.modules) >= 15
    assert sum(is_front_end(m) for m in GRAPH.modules) >= 15


def test_base_imports_only_the_base():
    _fail([e.where() for e in GRAPH.edges if e.src in BASE and e.dst not in BASE],
          "errors.py and units.py import nothing else of thinpool")


def test_engine_never_imports_a_front_end():
    _fail([e.where() for e in GRAPH.edges
           if is_engine(e.src) and is_front_end(e.dst) and e.dst not in ENGINE_MAY_IMPORT],
          "an engine module imports a front end (interop/, containers/, control/, nbd/, simulate/, cli/)")


def test_what_the_engine_may_import_stands_alone():
    """The IR (and its package's __init__, which importing it runs) imports at most the base."""
    allowed = set(ENGINE_MAY_IMPORT)
    parents = {m.rpartition(".")[0] for m in allowed}
    bad = [e.where() for e in GRAPH.edges if e.src in allowed | parents and e.dst not in BASE]
    _fail(bad, "a module the engine may import pulls in more than the base")


def test_interop_works_over_the_ir_only():
    bad = [e.where() for e in GRAPH.edges
           if e.src.startswith("thinpool.interop") and not e.dst.startswith("thinpool.interop")
           and e.dst not in BASE and e.dst not in INTEROP_MAY_IMPORT]
    _fail(bad, "interop/ imports beyond its IR, the base and INTEROP_MAY_IMPORT (never the pool)")


def test_only_the_cli_imports_the_cli():
    bad = [e.where() for e in GRAPH.edges
           if (e.dst == "thinpool.cli" or e.dst.startswith("thinpool.cli."))
           and not (e.src.startswith("thinpool.cli") or e.src == "thinpool.__main__")]
    _fail(bad, "a library module imports the CLI (the CLI is the outermost layer)")


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
        succ.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan, recursive: the graph has ~100 nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a two-module and a three-module cycle are found, a chain is not."""
    mk = lambda a, b: Edge(a, b, "x.py", 1, False, False)  # noqa: E731
    assert _cycles([mk("a", "b"), mk("b", "a"), mk("b", "c")]) == [["a", "b"]]
    assert _cycles([mk("a", "b"), mk("b", "c"), mk("c", "a")]) == [["a", "b", "c"]]
    assert _cycles([mk("a", "b"), mk("b", "c")]) == []


def test_no_import_cycles():
    runtime = [e for e in GRAPH.edges if not e.type_only and e.src != e.dst]
    problems = []
    for comp in _cycles(runtime):
        if frozenset(comp) in ALLOWED_CYCLES:
            continue
        inside = set(comp)
        problems.append("cycle " + " <-> ".join(comp) + ":\n    " +
                        "\n    ".join(sorted({e.where() for e in runtime if e.src in inside and e.dst in inside})))
    _fail(problems, "import cycles (lazy imports count; list a justified exception in ALLOWED_CYCLES)")


def test_allowed_cycles_still_exist():
    """An exception that no longer applies is removed, so the list stays true."""
    found = {frozenset(c) for c in _cycles([e for e in GRAPH.edges if not e.type_only and e.src != e.dst])}
    assert not [sorted(c) for c in ALLOWED_CYCLES if c not in found]


def test_no_private_names_outside_their_package():
    _fail([f"{path}:{line}: {src} uses {owner}.{name}" for src, path, line, owner, name in GRAPH.private_uses],
          "a module uses another package's _private name")


def test_front_ends_do_not_touch_engine_private_members():
    bad = [f"{path}:{line}: {src} uses .{attr}" for src, path, line, attr in GRAPH.member_uses if is_front_end(src)]
    _fail(bad, "a front end uses a private member of the engine's objects (use the public interface)")


def test_private_name_scanner_sees_each_form(tmp_path):
    """The checker itself: ``from X import _y``, ``X._y`` through an import alias and a ``pool._lock``
    in a front end are each reported; ``self._lock`` and same-package uses are not."""
    root = tmp_path / PKG
    (root / "cli").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "pool.py").write_text("_hidden = 1\nclass Pool:\n    def f(self):\n        return self._lock\n")
    (root / "thin.py").write_text("from .pool import _hidden\n")
    (root / "cli" / "__init__.py").write_text("")
    (root / "cli" / "ops.py").write_text(
        "from thinpool.pool import _hidden\nfrom thinpool import pool as P\nx = P._hidden\n"
        "def g(pool):\n    with pool._lock:\n        return self._lock, self.pool._slot\n")
    g = build_graph(root)
    assert sorted((src, line, name) for src, _, line, _, name in g.private_uses) == [
        ("thinpool.cli.ops", 1, "_hidden"), ("thinpool.cli.ops", 3, "_hidden")]
    assert [(src, line, attr) for src, _, line, attr in g.member_uses if is_front_end(src)] == [
        ("thinpool.cli.ops", 5, "_lock"), ("thinpool.cli.ops", 6, "_slot")]
    assert any(e.src == "thinpool.cli.ops" and e.dst == "thinpool.pool" for e in g.edges)


def test_design_doc_names_every_module():
    """docs/design.md's layout table lists every module, so the picture cannot silently go stale."""
    text = (ROOT.parent / "docs" / "design.md").read_text(encoding="utf-8")
    missing = []
    for mod, path in GRAPH.modules.items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if rel not in text and f"`{path.name}`" not in text:
            missing.append(f"{PKG}/{rel} ({mod})")
    _fail(missing, "modules missing from docs/design.md (add a row to the layout table)")


def test_design_doc_diagram_names_every_engine_module():
    """The layer diagram of docs/design.md (the picture above the table) names every top-level module."""
    text = (ROOT.parent / "docs" / "design.md").read_text(encoding="utf-8")
    start = text.index("```\n  front ends")
    diagram = text[start:text.index("```", start + 3)]
    missing = [f"{PKG}/{path.name}" for path in sorted(ROOT.glob("*.py"))
               if path.name not in ("__init__.py", "__main__.py") and path.name not in diagram]
    _fail(missing, "engine modules missing from the layer diagram of docs/design.md (name each in its layer)")
