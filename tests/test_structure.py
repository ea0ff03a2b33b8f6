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
  touch the engine's private members listed in :data:`ENGINE_PRIVATE_MEMBERS` on any object;
* the library API (:data:`PUBLIC_API_MODULES`) has type hints on every parameter, a return
  annotation and a docstring on every public function, class and method; and no annotation in the
  package names something its module never binds (``Callable`` used but not imported).

Each failure names the file and line.
"""

from __future__ import annotations

import ast
import builtins
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


# ------------------------------------------------------------------------- the public API's hints
#: the modules that make up the library API (docs: README.md "Library", docs/simulate.md, docs/containers.md)
#: -> what of it they hold; every public function and method in them has full type hints and a docstring
PUBLIC_API_MODULES = {
    "thinpool": "the package's exports (``from thinpool import Pool``)",
    "thinpool.errors": "the error hierarchy",
    "thinpool.units": "parse_size",
    "thinpool.pool": "Pool",
    "thinpool.pool_txn": "Pool's commit, batch, check and repair methods (a base class of Pool)",
    "thinpool.pool_devices": "Pool's volume methods: create_thin, snapshot, delete, rename, ... (a base of Pool)",
    "thinpool.pool_features": "Pool's feature settings (a base class of Pool)",
    "thinpool.pool_accounting": "Pool's usage and status (a base class of Pool)",
    "thinpool.status": "PoolStatus, Usage",
    "thinpool.thin": "Thin, and apply_io re-exported (docs/simulate.md)",
    "thinpool.batch_io": "apply_io, BatchOutcome",
    "thinpool.activation": "Activation (Pool.activate)",
    "thinpool.check": "CheckReport (Pool.check)",
    "thinpool.repair": "Pool.repair's report",
    "thinpool.poolspace": "TrimResult (Pool.trim)",
    "thinpool.images": "import_image, export_image",
    "thinpool.volume_bytes": "write_volume, read_volume, byte_range",
    "thinpool.simulate": "replay, run, sweep and their results (lazy exports)",
    "thinpool.simulate.replay_volume": "replay, replay_file",
    "thinpool.simulate.replay_sources": "ArrayTrace",
    "thinpool.simulate.scenario": "run, load_scenario, parse_scenario, Scenario",
    "thinpool.simulate.sweeps": "sweep, SweepResult",
    "thinpool.simulate.results": "Result, ReplayResult",
    "thinpool.simulate.traces": "open_trace and the OP_* codes (docs/simulate.md)",
    "thinpool.containers.snapshotter": "Snapshotter and what it returns",
    "thinpool.containers.filters": "containerd's walk filters",
    "thinpool.containers.layers": "LayerStore and its rows",
    "thinpool.containers.image_store": "image import onto a pool",
    "thinpool.containers.demo": "the demo walkthrough",
    "thinpool.containers.realfs": "Attached (docs/nbd.md)",
}

#: decorators whose function is not a separate piece of API (the getter holds the docstring)
_NOT_API_DECORATORS = (".setter", ".deleter", "overload")


def _api_problems(path: Path, display: str) -> list[str]:
    """What the public functions, classes and methods of one source file lack: a type hint on a
    parameter (``self``/``cls`` excepted), a return annotation (``__init__`` excepted), a docstring
    (dunder methods excepted).  Public: no leading underscore, at module level or in a public class."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[str] = []

    def function(node: ast.FunctionDef | ast.AsyncFunctionDef, owner: str, method: bool) -> None:
        name = node.name
        dunder = name.startswith("__") and name.endswith("__")
        if name.startswith("_") and not dunder:
            return
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if any(d.endswith(_NOT_API_DECORATORS) for d in decorators):
            return
        a = node.args
        params = a.posonlyargs + a.args + a.kwonlyargs
        if method and "staticmethod" not in decorators and params:
            params = params[1:]  # self / cls
        missing = [p.arg for p in params if p.annotation is None]
        missing += [f"*{v.arg}" for v in (a.vararg, a.kwarg) if v is not None and v.annotation is None]
        lacks = []
        if missing:
            lacks.append(f"type hints on {', '.join(missing)}")
        if node.returns is None and name != "__init__":
            lacks.append("a return annotation")
        if not dunder and ast.get_docstring(node) is None:
            lacks.append("a docstring")
        if lacks:
            out.append(f"{display}:{node.lineno}: {owner}{name} lacks {' and '.join(lacks)}")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function(node, "", False)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                out.append(f"{display}:{node.lineno}: class {node.name} lacks a docstring")
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    function(sub, f"{node.name}.", True)
    return out


def _module_path(mod: str) -> Path:
    rel = mod.split(".")[1:]
    pkg = ROOT.joinpath(*rel)
    return pkg / "__init__.py" if pkg.is_dir() else pkg.with_suffix(".py")


def test_public_api_has_type_hints_and_docstrings():
    """Project rule: the public API has type hints and docstrings -- every public function, class and
    method of :data:`PUBLIC_API_MODULES` (checked on the source; nothing is imported)."""
    problems = []
    for mod in PUBLIC_API_MODULES:
        path = _module_path(mod)
        assert path.is_file(), f"{mod}: no {path} (update PUBLIC_API_MODULES)"
        problems += _api_problems(path, f"{PKG}/{path.relative_to(ROOT).as_posix()}")
    _fail(problems, "public API without full type hints or a docstring")


def test_public_api_modules_cover_the_package_exports():
    """Every module the lazy exports of ``thinpool`` and ``thinpool.simulate`` (and the package's own
    imports) come from is in :data:`PUBLIC_API_MODULES`, so the hint check follows the exports."""
    missing = []
    for pkg in ("thinpool", "thinpool.simulate"):
        tree = ast.parse(_module_path(pkg).read_text(encoding="utf-8"))
        sources = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                    any(isinstance(t, ast.Name) and t.id in ("_LAZY", "_WHERE") for t in node.targets):
                sources |= {f"{pkg}.{v.value}" for v in node.value.values if isinstance(v, ast.Constant)}
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and \
                    any(not a.name.startswith("_") and not (a.asname or "").startswith("_") for a in node.names):
                sources.add(f"{pkg}.{node.module}")
        assert sources, f"{pkg}: no exports found (has the lazy-export table been renamed?)"
        missing += [f"{pkg} exports from {m}" for m in sorted(sources - set(PUBLIC_API_MODULES))]
    _fail(missing, "modules of the public API missing from PUBLIC_API_MODULES")


def test_api_checker_sees_each_lack(tmp_path):
    """The hint checker itself: each kind of lack is reported, and private or exempt code is not."""
    src = tmp_path / "m.py"
    src.write_text('''
def good(a: int, *rest: str, k: bool = False, **kw: int) -> int:
    """Fine."""
def no_hint(a, b: int) -> None:
    """Doc."""
def no_return(a: int):
    """Doc."""
def no_doc(a: int) -> int:
    return a
def stars(*args, **kwargs) -> None:
    """Doc."""
def _private(a):
    pass
class Bare:
    def __init__(self, pool) -> None:
        pass
    def __exit__(self, exc_type, exc, tb) -> None:
        pass
    @property
    def size(self) -> int:
        """Doc."""
    @size.setter
    def size(self, value):
        pass
    @staticmethod
    def make(x) -> "Bare":
        """Doc."""
    def _helper(self, x):
        pass
class _Hidden:
    def open(self, x):
        pass
''')
    got = [p.split(": ", 1)[1] for p in _api_problems(src, "m.py")]
    assert got == ["no_hint lacks type hints on a",
                   "no_return lacks a return annotation",
                   "no_doc lacks a docstring",
                   "stars lacks type hints on *args, *kwargs",
                   "class Bare lacks a docstring",
                   "Bare.__init__ lacks type hints on pool",
                   "Bare.__exit__ lacks type hints on exc_type, exc, tb",
                   "Bare.make lacks type hints on x"], got


def _module_names(tree: ast.Module) -> set[str]:
    """The names a module binds at module level (imports -- under ``if TYPE_CHECKING:`` too --,
    definitions, assignments), plus the builtins."""
    names = set(dir(builtins))

    def visit(stmts: list[ast.stmt]) -> None:
        for n in stmts:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                names.update(x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                visit(n.body)
                visit(getattr(n, "orelse", []))
                visit(getattr(n, "finalbody", []))
                for h in getattr(n, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    return names


def _annotation_names(node: ast.AST):
    """The free names of an annotation (string annotations parsed too)."""
    for x in ast.walk(node):
        if isinstance(x, ast.Constant) and isinstance(x.value, str):
            try:
                yield from _annotation_names(ast.parse(x.value, mode="eval"))
            except SyntaxError:
                continue
        elif isinstance(x, ast.Name):
            yield x.id


def _unbound_annotation_names(path: Path, display: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    known = _module_names(tree)
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    functions += [m for c in tree.body if isinstance(c, ast.ClassDef)
                  for m in c.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for f in functions:
        a = f.args
        anns = [p.annotation for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
                if p is not None and p.annotation is not None]
        anns += [f.returns] if f.returns is not None else []
        for name in sorted({n for ann in anns for n in _annotation_names(ann)} - known):
            out.append(f"{display}:{f.lineno}: {f.name}'s annotations name {name}, which the module never binds")
    return out


def test_annotations_name_only_what_their_module_binds():
    """Under ``from __future__ import annotations`` a hint naming something never imported (``Callable``
    without its import) still runs, but the hint is wrong: ``typing.get_type_hints`` raises NameError and
    a type checker reports it.  Every module-level function and method of the package is checked."""
    problems = []
    for path in GRAPH.modules.values():
        problems += _unbound_annotation_names(path, f"{PKG}/{path.relative_to(ROOT).as_posix()}")
    _fail(problems, "annotations naming what their module does not bind")


def test_annotation_checker_sees_an_unbound_name(tmp_path):
    """The checker itself: a name bound only under TYPE_CHECKING is fine, one never bound is reported."""
    src = tmp_path / "m.py"
    src.write_text('''from __future__ import annotations
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from x import Pool
def f(pool: Pool, cb: Callable[[], bool] | None, n: "Sequence[int]") -> list[int]:
    """Doc."""
class C:
    def m(self, t: Thin) -> C:
        """Doc."""
''')
    got = [p.split(": ", 1)[1] for p in _unbound_annotation_names(src, "m.py")]
    assert got == ["f's annotations name Callable, which the module never binds",
                   "f's annotations name Sequence, which the module never binds",
                   "m's annotations name Thin, which the module never binds"], got
