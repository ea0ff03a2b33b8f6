"""The command lines the documentation shows parse against the CLI as it is.

Every ``thinpool ...`` command in a shell block of README.md and docs/*.md, and in every command's
``Examples:`` block of ``--help``, names existing commands and options with the right number of arguments
(click parses it without running it); every ``--option`` named in an inline ``thinpool CMD ...`` code span
of the docs exists on that command.  And the ``Examples:`` blocks render as blocks (one command a line),
so that what ``--help`` shows can be pasted.
"""

from __future__ import annotations

import glob
import os
import re
import shlex

import click
import pytest
from click.testing import CliRunner

from thinpool.cli import load_all_commands, main
from tests.support import REPO_ROOT

load_all_commands()

_SHELL_OPS = {"|", "||", "&", "&&", ";", ";;", "(", ")", ">", ">>", "<", "<<", "2>", "2>&1", "|&"}


def _commands() -> list[tuple[tuple[str, ...], click.Command]]:
    out = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, path + (name,))
    walk(main, ())
    return out


def _rendered_help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(main, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, (path, result.output)
    return result.stdout


def _thinpool_invocations(line: str) -> list[list[str]]:
    """The argument lists of the ``thinpool`` commands of one shell line (after ``sudo``, ``VAR=x``, a
    ``$ `` prompt; up to the next shell operator)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a command line
        return []
    found, at_start, i = [], True, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _SHELL_OPS or tok.startswith(">") or tok.startswith("<"):
            at_start = True
        elif at_start and (tok in ("sudo", "$", "time", "exec", "then", "do") or re.fullmatch(r"\w+=\S*", tok)):
            pass
        elif at_start and tok == "thinpool":
            j = i + 1
            while j < len(tokens) and tokens[j] not in _SHELL_OPS and not tokens[j].startswith((">", "<")):
                if tokens[j].startswith("[") or tokens[j] == "...":  # a synopsis: check the words before it
                    break
                j += 1
            found.append(tokens[i + 1:j])
            while j < len(tokens) and tokens[j] not in _SHELL_OPS and not tokens[j].startswith((">", "<")):
                j += 1
            i = j
            continue
        else:
            at_start = False
        i += 1
    return found


_path_convert = click.Path.convert


def _convert_without_existence_check(self, value, param, ctx):  # type: ignore[no-untyped-def]
    saved, self.exists = self.exists, False  # the docs' example files are not here
    try:
        return _path_convert(self, value, param, ctx)
    finally:
        self.exists = saved


@pytest.fixture(autouse=True)
def _paths_need_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(click.Path, "convert", _convert_without_existence_check)


def _parse(args: list[str]) -> None:
    """Parse ``thinpool ARGS`` the way click does before running anything (raises click's UsageError)."""
    try:
        _parse_and_resolve(args)
    except click.exceptions.Exit as exc:  # --help, --version
        assert exc.exit_code == 0, args


def _rest(ctx: click.Context) -> list[str]:
    """A group's subcommand and its arguments, as parsed (click >= 8.2 keeps them in ``_protected_args``)."""
    protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
    return [*protected, *ctx.args]


def _parse_and_resolve(args: list[str]) -> None:
    ctx = main.make_context("thinpool", list(args), resilient_parsing=False)
    cmd: click.Command = main
    rest = _rest(ctx)
    while isinstance(cmd, click.Group) and rest:
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None, args
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
        cmd = sub
        if isinstance(cmd, click.Group):
            rest = _rest(ctx)


def _examples_blocks(text: str) -> list[list[str]]:
    """The lines of each ``Examples:`` block of rendered help (the lines indented under it)."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Examples:":
            indent = len(line) - len(line.lstrip())
            block = []
            for nxt in lines[i + 1:]:
                if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt.strip())
            blocks.append(block)
    return blocks


_HELP = {path: _rendered_help(path) for path, _cmd in _commands()}
_HELP_EXAMPLES = [(" ".join(path) or "thinpool", line) for path, text in _HELP.items()
                  for block in _examples_blocks(text) for line in block]


@pytest.mark.parametrize("path", [p for p, t in _HELP.items() if "Example" in t], ids=" ".join)
def test_help_examples_render_as_a_block_of_one_command_a_line(path: tuple[str, ...]) -> None:
    # the Examples heading sits at the paragraphs' indent and every example line is its own line, as written
    text = _HELP[path]
    assert "\n  Examples:\n    " in text, text
    assert not re.search(r"Examples?: \S", text), text  # no example folded into a paragraph
    for block in _examples_blocks(text):
        assert block and all("thinpool" in ln or ln.startswith(("nbd", "qemu", "#")) for ln in block), block


@pytest.mark.parametrize("where,line", _HELP_EXAMPLES)
def test_help_example_parses(where: str, line: str) -> None:
    for args in _thinpool_invocations(line):
        try:
            _parse(args)
        except click.UsageError as exc:
            pytest.fail(f"`thinpool {where} --help` example {line!r}: {exc.format_message()}")


def _doc_files() -> list[str]:
    return [os.path.join(REPO_ROOT, "README.md"), *sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))]


def _doc_shell_lines() -> list[tuple[str, str]]:
    out = []
    for path in _doc_files():
        in_block, rel = None, os.path.relpath(path, REPO_ROOT)
        with open(path, encoding="utf-8") as f:
            for line in f:
                stripped = line.strip()
                if stripped.startswith("```"):
                    in_block = None if in_block is not None else stripped[3:]
                    continue
                if in_block in ("sh", "bash", "console") and "thinpool" in line:
                    out.append((rel, line.rstrip("\n")))
    return out


@pytest.mark.parametrize("doc,line", _doc_shell_lines())
def test_doc_shell_example_parses(doc: str, line: str) -> None:
    for args in _thinpool_invocations(line):
        try:
            _parse(args)
        except click.UsageError as exc:
            pytest.fail(f"{doc}: {line!r}: {exc.format_message()}")


def _doc_inline_spans() -> list[tuple[str, str]]:
    out = []
    for path in _doc_files():
        rel = os.path.relpath(path, REPO_ROOT)
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for span in re.findall(r"`([^`\n]*\bthinpool [^`\n]*)`", text):
            if "--" in span:
                out.append((rel, span))
    return out


def _options_of(cmd: click.Command) -> set[str]:
    return {opt for p in cmd.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("doc,span", _doc_inline_spans())
def test_doc_inline_command_options_exist(doc: str, span: str) -> None:
    # `thinpool CMD [SUB] ... --opt` in prose (or `thinpool A/B --x/--y`): every --opt is an option of the
    # command(s) named (or of thinpool itself)
    words = span[span.index("thinpool ") + len("thinpool "):].split()
    cmds: list[click.Command] = []
    for name in (words[0].split("/") if words else []):
        cmd: click.Command = main
        rest = [name, *words[1:]]
        while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
            cmd = cmd.commands[rest.pop(0)]
        cmds.append(cmd)
    for cmd in cmds or [main]:
        known = _options_of(cmd) | _options_of(main) | {"--help"}
        for word in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span):
            assert word in known, f"{doc}: `{span}`: {word} is not an option of {cmd.name}"


def _readme_python_blocks() -> list[str]:
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_library_example_prints_what_its_comments_say(tmp_path) -> None:
    # the README's first library example, run as written (its pool path moved to tmp_path): every
    # `print(...)  # EXPECTED` line prints EXPECTED ("..." stands for any text, quotes are not printed)
    import contextlib
    import io
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no python example"
    code = blocks[0].replace("/tmp/pool", str(tmp_path / "pool"))
    expected = []
    for line in code.splitlines():
        m = re.match(r"\s*print\(.*\)\s+#\s*(.+)$", line)
        if m:
            want = m.group(1).strip().strip('"')
            expected.append(re.compile(".*".join(re.escape(part) for part in want.split("...")) + r"\s*"))
    assert expected, "the README's example prints nothing to compare"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().splitlines()
    assert len(lines) == len(expected), lines
    for got, want in zip(lines, expected):
        assert want.fullmatch(got), (got, want.pattern)


def test_simulate_doc_library_examples_run(tmp_path, monkeypatch) -> None:
    # docs/simulate.md's trace-reading and replay examples, run as written on a small fio iolog (the 1 PiB
    # build example is left out: it needs minutes and gigabytes)
    import contextlib
    import io
    text = open(os.path.join(REPO_ROOT, "docs", "simulate.md"), encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "1PiB" not in b]
    assert len(blocks) >= 2, blocks
    pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    monkeypatch.chdir(tmp_path)
    with open("run.iolog", "w") as f:
        f.write("fio version 3 iolog\n0 disk.img add\n0 disk.img open\n")
        for i in range(200):
            f.write(f"{i * 1000} disk.img write {(i * 7919 % 4096) * 4096} 4096\n")
        f.write("200000 disk.img close\n")
    out = io.StringIO()
    for block in blocks:
        code = block.replace("/tmp/p", str(tmp_path / "p"))
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/simulate.md", "exec"), {"__name__": "simulate_example"})
    printed = out.getvalue().split()
    assert printed[:3] == ["['disk.img']", "200", "0"], printed  # trace.volumes, records, bad_records
    assert os.path.getsize("out.json") > 0 and os.path.getsize("s.parquet") > 0


def test_readme_cli_block_runs_as_written(tmp_path) -> None:
    # the README's CLI block, every line in order in one shell (`set -e`: any failure stops it), with its
    # pool /tmp/p moved into tmp_path and `thinpool` this checkout's CLI
    import subprocess
    import sys
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", text, flags=re.S) if "thinpool create /tmp/p" in b)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "thinpool").write_text(f"#!/bin/sh\nexec {sys.executable} -m thinpool \"$@\"\n")
    (bindir / "thinpool").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(
                   os.pathsep) if p]))
    script = "set -e\n" + block.replace("/tmp/p", str(tmp_path / "p"))
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Usage: thinpool" in r.stdout and "committed layer1" in r.stdout
