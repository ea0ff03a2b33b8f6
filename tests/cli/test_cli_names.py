"""CLI names: the ``thinpool snapshotter`` group, the deprecated top-level aliases, loud import failures
and the documented exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import thinpool.cli as cli
from thinpool import Pool
from thinpool.cli import main
from thinpool.cli.containers_cmds import DEPRECATED_ALIASES
from thinpool.errors import ThinpoolError


def run(*args: str, code: int = 0):
    """Run the CLI in-process; require exit status ``code``."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result


@pytest.fixture
def pool(tmp_path) -> str:
    path = str(tmp_path / "pool")
    Pool.create(path, data_size="16MiB").close()
    return path


def _session(pool: str, names: dict[str, list[str]]) -> list[dict]:
    """prepare -> commit -> view -> update -> stat -> list -> usage -> remove, with the given command words;
    returns each step's JSON (times dropped and the pool path replaced: they differ between two runs)."""
    out = []
    steps = [
        ("prepare", [pool, "k1", "--size", "1M", "--label", "a=1"]),
        ("commit", [pool, "layer", "k1"]),
        ("view", [pool, "v1", "layer"]),
        ("update", [pool, "layer", "--label", "b=2"]),
        ("stat", [pool, "layer"]),
        ("list", [pool, "--filter", "kind==committed"]),
        ("usage", [pool, "layer"]),
        ("remove", [pool, "v1"]),
    ]
    for verb, args in steps:
        res = run(*names[verb], *args, "--json")
        data = json.loads(res.stdout.replace(pool, "POOL"))
        for rec in data if isinstance(data, list) else [data]:
            rec.pop("created", None)
            rec.pop("updated", None)
        out.append(data)
    return out


NEW = {verb: ["snapshotter", verb] for verb in DEPRECATED_ALIASES.values()}
OLD = {new: [old] for old, new in DEPRECATED_ALIASES.items()}


def test_snapshotter_group_runs_every_verb(pool) -> None:
    got = _session(pool, NEW)
    assert got[0]["kind"] == "active" and got[0]["labels"] == {"a": "1"}
    assert got[1]["kind"] == "committed" and got[1]["read_only"] is True
    assert got[2]["kind"] == "view"
    assert got[4]["labels"] == {"b": "2"}
    assert [r["name"] for r in got[5]] == ["layer"]
    assert got[6]["key"] == "layer"
    assert got[7]["removed"] == "v1"
    with Pool.open(pool, read_only=True) as p:
        assert [t.name for t in p.thins()] == [got[1]["volume"]]


def test_deprecated_aliases_behave_identically_and_note_it_once(tmp_path) -> None:
    results = []
    for i, names in enumerate((NEW, OLD)):
        path = str(tmp_path / f"pool{i}")
        Pool.create(path, data_size="16MiB").close()
        results.append(_session(path, names))
    assert results[0] == results[1]
    fail_args = {"prepare": ["k", "--parent", "nope"], "view": ["v", "nope"], "commit-snapshot": ["x", "nope"],
                 "remove-snapshot": ["nope"], "stat-snapshot": ["nope"], "update-snapshot": ["nope"],
                 "snapshots": ["--filter", "kind==nope"], "snapshot-usage": ["nope"]}
    path = str(tmp_path / "pool1")
    for old, new in DEPRECATED_ALIASES.items():
        assert "deprecated" not in run(old, "--help").stderr  # --help runs nothing, notes nothing
        res = CliRunner().invoke(main, [old, path, *fail_args[old]])
        assert res.exit_code in (1, 2), (old, res.stderr)
        lines = res.stderr.splitlines()
        assert lines[0] == (f"thinpool: note: 'thinpool {old}' is deprecated and will be removed; "
                            f"use 'thinpool snapshotter {new}'"), res.stderr
        assert sum("deprecated" in ln for ln in lines) == 1
        # the same failure as the new name gives
        same = CliRunner().invoke(main, ["snapshotter", new, path, *fail_args[old]])
        assert (same.exit_code, same.stderr.splitlines()) == (res.exit_code, lines[1:]), (old, same.stderr)


def test_help_lists_the_group_not_the_aliases() -> None:
    text = run("--help").stdout
    assert "snapshotter" in text
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert not listed & set(DEPRECATED_ALIASES), listed & set(DEPRECATED_ALIASES)
    sub = run("snapshotter", "--help").stdout
    for verb in DEPRECATED_ALIASES.values():
        assert f"  {verb} " in sub
    # the two commits say which is which
    assert "snapshotter commit" in " ".join(run("commit", "--help").stdout.split())
    assert "thinpool commit" in " ".join(run("snapshotter", "commit", "--help").stdout.split())


def test_a_missing_command_module_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(cli, "_UNLOADED", ["thinpool.cli.no_such_commands"])
    with pytest.raises(ModuleNotFoundError, match="no_such_commands"):
        cli.load_all_commands()
    assert cli._UNLOADED == ["thinpool.cli.no_such_commands"]  # still listed: a retry fails again


def test_a_broken_command_module_is_an_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "thinpool.cli.broken_commands", None)  # importing it raises ImportError
    monkeypatch.setattr(cli, "_UNLOADED", ["thinpool.cli.broken_commands"])
    with pytest.raises(ImportError):
        cli.load_all_commands()


def test_exit_statuses_match_errors_doc(pool) -> None:
    import thinpool.errors as errors
    assert "**1**" in errors.__doc__ and "**2**" in errors.__doc__
    res = run("snapshotter", "stat", pool, "nope", code=1)          # a ThinpoolError (NotFound)
    assert res.stderr.startswith("thinpool: error: ") and len(res.stderr.splitlines()) == 1
    run("snapshotter", "stat", pool, code=2)                          # missing argument: usage
    run("snapshotter", "no-such-verb", code=2)                        # unknown command: usage
    run("status", str(pool) + "-missing", code=1)
    assert issubclass(errors.NotFound, ThinpoolError)


def test_command_homes_name_the_module_that_defines_each_command() -> None:
    """COMMAND_HOMES lets an invoked command import only its own module: every entry must be right."""
    import importlib
    defined = {c.name: m for m in cli.COMMAND_MODULES for c in importlib.import_module(m).COMMANDS}
    assert {n: defined.get(n) for n in cli.COMMAND_HOMES} == cli.COMMAND_HOMES


def test_a_command_imports_only_its_own_module_and_help_keeps_the_section_order() -> None:
    code = ("import sys\nfrom thinpool import cli\ncli.main(['snapshot', '--help'], standalone_mode=False)\n"
            "print(sorted(m for m in cli.COMMAND_MODULES if m in sys.modules))\n"
            "cli.load_all_commands()\nprint([t for t, _ in cli.main.sections])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded, sections = r.stdout.splitlines()[-2:]
    assert loaded == str(["thinpool.cli.volume_cmds"])
    import importlib
    order = [importlib.import_module(m).SECTION for m in cli.COMMAND_MODULES]  # (modules may share one)
    assert sections == str(list(dict.fromkeys(order)))
