"""The ``thinpool`` command line: a thin shell over the library.

Structure
---------
* :data:`main` is the click group (entry point ``thinpool = "thinpool.cli:main"``).
* Commands live in *command modules* listed in :data:`COMMAND_MODULES`.  Each module defines

  - ``SECTION: str`` -- the heading its commands appear under in ``thinpool --help``;
  - ``COMMANDS: list[click.Command]`` -- its commands, in the order ``--help`` lists them.

  Adding a module is one line in :data:`COMMAND_MODULES`.  A listed module that cannot be imported
  (missing, or failing) is an error that propagates: a broken CLI fails loudly.  Modules are imported
  on demand: the invoked command's own module (:data:`COMMAND_HOMES`; ``thinpool snapshot`` imports only
  the volume commands), else in order until it is found; ``--help`` and :func:`load_all_commands` import
  them all.
* Every pool-touching command goes through :func:`thinpool.cli.registry.run_op`, which routes it to a
  serving process's control socket when the pool is being served (see :mod:`thinpool.cli.registry`).

Error handling (here, once, for every command): a :class:`~thinpool.errors.ThinpoolError` (or an
``OSError`` such as a missing input file) prints one line ``thinpool: error: <message>`` on stderr and
exits 1; usage errors exit 2 (click); a closed stdout pipe (``thinpool dump POOL | head``) is silent and
exits 1.  The exit statuses are documented in :mod:`thinpool.errors`.
"""

from __future__ import annotations

import errno
import faulthandler
import importlib
import io
import math
import os
import sys
import warnings
from typing import Any

import click

from thinpool.errors import ThinpoolError, ThinpoolWarning

#: Command modules, in the order their sections appear in ``thinpool --help``.
COMMAND_MODULES: list[str] = [
    "thinpool.cli.pool_cmds",
    "thinpool.cli.volume_cmds",
    "thinpool.cli.containers_cmds",
    "thinpool.cli.image_cmds",
    "thinpool.cli.compare_cmds",
    "thinpool.cli.interop_cmds",
    "thinpool.cli.serve_cmds",
    "thinpool.cli.repair_cmds",
    "thinpool.cli.simulate_cmds",
]

#: The module of each command, so that invoking one imports only its own module (``thinpool snapshot``
#: skips the pool commands' import); a command missing here is found by importing the modules in order.
#: tests/cli/test_cli_names.py checks the table against what the modules define.
COMMAND_HOMES: dict[str, str] = {
    **dict.fromkeys(["create", "status", "resize", "set", "set-autoextend", "commit", "set-transaction-id",
                     "reserve-metadata-snap", "release-metadata-snap", "check", "trim"], "thinpool.cli.pool_cmds"),
    **dict.fromkeys(["create-thin", "snapshot", "delete", "rename", "ls", "usage", "write", "read", "discard",
                     "import", "export"], "thinpool.cli.volume_cmds"),
    **dict.fromkeys(["dump", "restore", "export-metadata", "import-metadata", "delta", "rmap", "metadata-size"],
                    "thinpool.cli.interop_cmds"),
    "serve": "thinpool.cli.serve_cmds",
    "repair": "thinpool.cli.repair_cmds",
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def error_line(exc: BaseException) -> str:
    """The one-line message printed for ``exc`` (newlines folded, never empty)."""
    if isinstance(exc, OSError) and not isinstance(exc, ThinpoolError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class _ClosedStream(io.RawIOBase):
    """A standard stream whose file descriptor was closed when thinpool started: reading or writing it
    fails with EBADF naming it (as coreutils report ``write error: Bad file descriptor``), so a command
    whose output cannot be written ends with an error instead of losing it silently."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise OSError(errno.EBADF, f"{self.what} is closed")

    def write(self, data: Any) -> int:
        raise OSError(errno.EBADF, f"{self.what} is closed")


def guard_standard_fds() -> None:
    """Give file descriptors 0-2 that were closed when the process started (``thinpool ls >&-``) to
    /dev/null before any command runs (:func:`thinpool.pooldir.occupy_closed_standard_fds`: else a
    pool's lock and metadata files took descriptors 1 and 2).  Python left ``sys.stdin`` /
    ``sys.stdout`` None for a closed descriptor; they become streams that fail with EBADF ("standard
    input is closed", "standard output is closed"), so a command reading or printing through them
    reports that as its error instead of losing its output.  ``sys.stderr`` stays None: nothing can
    be reported there (the exit status still is)."""
    from thinpool.pooldir import occupy_closed_standard_fds
    closed = occupy_closed_standard_fds()
    if 0 in closed and sys.stdin is None:
        sys.stdin = io.TextIOWrapper(_ClosedStream("standard input"), encoding="utf-8")
    if 1 in closed and sys.stdout is None:
        sys.stdout = io.TextIOWrapper(_ClosedStream("standard output"), encoding="utf-8", write_through=True)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """``warnings.showwarning`` while a command runs: a :class:`ThinpoolWarning` is one line
    ``thinpool: warning: ...`` on stderr (not Python's file, line and source line); others as Python shows them."""
    if issubclass(category, ThinpoolWarning):
        click.echo(f"thinpool: warning: {' '.join(str(message).split())}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class SectionedGroup(click.Group):
    """A click group that lists its commands under per-module sections, in registration order,
    and turns library errors into one-line messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sections: list[tuple[str, list[str]]] = []
        self._section_rank: dict[str, int] = {}

    def add_section(self, title: str, commands: list[click.Command], rank: int | None = None) -> None:
        """Register ``commands`` under the help heading ``title`` (merged if the heading exists); ``rank``
        places the heading among the others (default: after those registered so far)."""
        for section_title, names in self.sections:
            if section_title == title:
                break
        else:
            names = []
            self._section_rank[title] = len(self.sections) if rank is None else rank
            self.sections.append((title, names))
            self.sections.sort(key=lambda sec: self._section_rank[sec[0]])
        for cmd in commands:
            if cmd.name in self.commands:
                raise RuntimeError(f"thinpool CLI: command {cmd.name!r} is registered twice")
            self.add_command(cmd)
            assert cmd.name is not None, "click's add_command refuses a command without a name"
            names.append(cmd.name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        home = COMMAND_HOMES.get(cmd_name)
        if cmd_name not in self.commands and home in _UNLOADED:
            _load_module(home)
        while cmd_name not in self.commands and _load_next_module():
            pass
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_all_commands()
        ordered = [n for _, names in self.sections for n in names]
        return ordered + sorted(n for n in self.commands if n not in ordered)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        load_all_commands()
        listed: set[str] = set()
        for title, names in self.sections:
            rows = []
            for name in names:
                cmd = self.get_command(ctx, name)
                if cmd is None or cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit=max(30, formatter.width - 28))))
                listed.add(name)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows, col_max=22)
        rest = [(n, c.get_short_help_str()) for n, c in sorted(self.commands.items())
                if n not in listed and not c.hidden]
        if rest:
            with formatter.section("Other commands"):
                formatter.write_dl(rest)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))

    def invoke(self, ctx: click.Context) -> Any:
        guard_standard_fds()  # before any command opens a pool file
        shown, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            _silence_stdout()
            raise click.exceptions.Exit(1) from None
        except ThinpoolError as exc:
            click.echo(f"thinpool: error: {error_line(exc)}", err=True)
            raise click.exceptions.Exit(1) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                _silence_stdout()
                raise click.exceptions.Exit(1) from None
            click.echo(f"thinpool: error: {error_line(exc)}", err=True)
            raise click.exceptions.Exit(1) from None
        finally:
            warnings.showwarning = shown


class WaitType(click.ParamType):
    """``--wait`` seconds: a number >= 0, or ``inf`` / ``forever`` (what a bare ``--wait`` means)."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            text = str(value).strip().lower()
            if not text.isascii() or "_" in text:  # float() also reads '٣' (3 s) and '1_0'
                self.fail(f"{str(value)[:40]!r} is not a number of seconds (or 'forever')", param, ctx)
            try:
                seconds = math.inf if text in ("inf", "forever", "") else float(text)
            except ValueError:
                self.fail(f"{value!r} is not a number of seconds (or 'forever')", param, ctx)
        if math.isnan(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a number of seconds >= 0", param, ctx)
        return seconds


#: Options of the ``thinpool`` group that may also be written after the command name.
GLOBAL_FLAGS = ("--allow-foreign",)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.lower() in ("inf", "forever")
    return True


def hoist_global_options(args: list[str]) -> list[str]:
    """Normalise the group's global options: a bare ``--wait`` becomes ``--wait=forever`` (it never takes
    the next word, except a number right after it before the command name: ``thinpool --wait 30 ...``),
    and ``--wait[=SECONDS]`` / ``--allow-foreign`` written after the command name (before ``--``) are
    moved before it, so ``thinpool create-thin --wait POOL v 1G`` works."""
    front: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":  # group-level options
        if args[i] == "--wait":
            if i + 1 < len(args) and _is_number(args[i + 1]):
                front.append(f"--wait={args[i + 1]}")
                i += 2
                continue
            front.append("--wait=forever")
        else:
            front.append(args[i])
        i += 1
    rest: list[str] = []
    hoisted: list[str] = []
    if i < len(args):
        rest.append(args[i])  # the command name
        i += 1
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if a == "--wait":
            hoisted.append("--wait=forever")
        elif a.startswith("--wait=") or a in GLOBAL_FLAGS:
            hoisted.append(a)
        else:
            rest.append(a)
        i += 1
    return front + hoisted + rest


@click.group(cls=SectionedGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="thinpool", prog_name="thinpool")
@click.option("--wait", "wait", type=WaitType(), default=None, envvar="THINPOOL_WAIT", metavar="[=SECONDS]",
              help="If the pool is locked by another process, wait for it (for ever, or up to SECONDS) instead "
                   "of failing.  May also follow the command name.  [env: THINPOOL_WAIT]")
@click.option("--allow-foreign", is_flag=True, envvar="THINPOOL_ALLOW_FOREIGN",
              help="Open a pool whose directory or files another user owns (refused by default: see "
                   "docs/security.md).  May also follow the command name.  [env: THINPOOL_ALLOW_FOREIGN]")
def main(wait: float | None, allow_foreign: bool) -> None:
    """Simulate Linux dm-thin thin pools: sparse data, O(1) snapshots, copy-on-write, real metadata.

    A pool is a directory (data file + metadata).  Sizes take binary units: 4096, 64K, 64KiB, 10G.

    \b
    Quick start:
      thinpool create /tmp/pool --data-size 10G
      thinpool create-thin /tmp/pool base 1G
      echo hello | thinpool write /tmp/pool base
      thinpool snapshot /tmp/pool base snap1
      thinpool ls /tmp/pool
      thinpool status /tmp/pool

    While a pool is served (`thinpool serve`), the pool commands are sent to the serving process
    over <pool>/control.sock; streaming commands (write/read/import/export) then need the NBD export.
    Every reporting command has --json.  Errors: one line on stderr, exit 1 (usage errors exit 2).

    New pools are private to their owner (directory 0700, files 0600; `create --mode`).  A pool
    file that is a symbolic link is never followed, and another user's pool is refused unless
    --allow-foreign is given.
    """
    if not faulthandler.is_enabled():
        # a fatal signal names where it struck on stderr (a SIGBUS on a pool's own maps is counted by
        # thinpool.faultguard, whose handler, installed later, sends every other fault on to this one:
        # docs/design.md, "Files changed under an open pool")
        try:
            faulthandler.enable()
        except (AttributeError, OSError, ValueError, RuntimeError):  # a stderr without a file descriptor
            pass
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        # a name with an undecodable byte (surrogateescape, as Python reads argv and file names; one an
        # older thinpool allowed) prints as that byte instead of failing the whole output
        sys.stdout.reconfigure(errors="surrogateescape")
    from thinpool import pooldir
    before = pooldir.defaults()
    pooldir.set_defaults(wait=wait or 0.0, allow_foreign=allow_foreign)
    # in-process callers (tests, CliRunner) get the previous defaults back after the command
    click.get_current_context().call_on_close(
        lambda: pooldir.set_defaults(wait=before.wait, allow_foreign=before.allow_foreign))


_UNLOADED: list[str] = list(COMMAND_MODULES)


def _load_module(name: str) -> None:
    """Import command module ``name`` (listed in ``_UNLOADED``) and add its commands under its section,
    placed as :data:`COMMAND_MODULES` orders them whatever the order of loading."""
    # a missing or broken command module is an error (it stays listed: a retry raises again)
    module = importlib.import_module(name)
    _UNLOADED.remove(name)
    rank = COMMAND_MODULES.index(name) if name in COMMAND_MODULES else len(COMMAND_MODULES)
    main.add_section(module.SECTION, list(module.COMMANDS), rank)


def _load_next_module() -> bool:
    """Import the next command module not imported yet and add its commands; False if none is left."""
    if not _UNLOADED:
        return False
    _load_module(_UNLOADED[0])
    return True


def load_all_commands() -> None:
    """Import every command module (and so register every op: a serving process answers them all)."""
    while _load_next_module():
        pass


__all__ = ["main", "COMMAND_MODULES", "COMMAND_HOMES", "error_line", "load_all_commands", "hoist_global_options"]
