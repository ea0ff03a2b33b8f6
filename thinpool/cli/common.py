"""Helpers shared by the command modules: option types, ``--json`` output, progress bars."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import click

from thinpool.errors import ThinpoolError
from thinpool.units import parse_size


class SizeType(click.ParamType):
    """A click parameter type for sizes with binary units (``4096``, ``64K``, ``64KiB``, ``10G``, ``8s``)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value, param.human_readable_name if param else "size")
        except ThinpoolError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


def _check_decimal(ptype: click.ParamType, value: Any, param: click.Parameter | None,
                   ctx: click.Context | None) -> None:
    """ASCII decimal integers only: click's ``int()`` also took ``1_000``, Arabic-Indic or other
    Unicode digits (``set-transaction-id P 0 ٣`` set the id to 3) and numbers of thousands of digits."""
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if not (digits.isascii() and digits.isdigit()):
            ptype.fail(f"{value[:40]!r} is not a decimal integer", param, ctx)
        if len(digits.lstrip("0")) > 30:
            ptype.fail(f"{value[:40]!r}... is too large ({len(digits)} digits)", param, ctx)


class IntRange(click.IntRange):
    """click's ``IntRange`` for ASCII decimal integers only (:func:`_check_decimal`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        _check_decimal(self, value, param, ctx)
        return super().convert(value, param, ctx)


class _Int(click.types.IntParamType):
    """click's ``INT`` for ASCII decimal integers only (:func:`_check_decimal`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        _check_decimal(self, value, param, ctx)
        return super().convert(value, param, ctx)


INT = _Int()


class ModeType(click.ParamType):
    """A pool directory mode in octal (``0700``, ``750``); the pool's files get it without execute bits."""

    name = "OCTAL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from thinpool.pooldir import check_mode
        try:
            mode = check_mode(value if isinstance(value, int) else str(value))
            assert mode is not None, "check_mode returns None only for None"
            return mode
        except ThinpoolError as exc:
            self.fail(str(exc), param, ctx)


MODE = ModeType()

#: ``--mode`` option of the commands that create a pool.
mode_option = click.option("--mode", type=MODE, default=None,
                           help="The pool directory's mode in octal (default 0700); its files get the same "
                                "bits without execute (0750 -> files 0640).")

#: ``POOL`` argument: a pool directory (existence is checked by the library, with its own error).
def _non_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A path argument's callback: an empty string is not a path (it is not the current directory)."""
    if value == "":
        raise click.BadParameter("must not be empty (an empty string names no file or directory)")
    return value


pool_argument = click.argument("pool", metavar="POOL", type=click.Path(file_okay=False, path_type=str),
                               callback=_non_empty)

#: a click command's function, as an option decorator made here takes and returns it
CommandFn = TypeVar("CommandFn", bound=Callable[..., Any])

#: ``--json`` flag for reporting commands.
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object/array on stdout.")


def abspath(path: str) -> str:
    """An absolute path (ops sent to a serving process must not depend on the client's cwd); a usage
    error for an empty string, which names no file (``os.path.abspath`` would make it the cwd)."""
    if path == "":
        raise click.UsageError("a path argument is empty: an empty string names no file or directory")
    return os.path.abspath(os.path.expanduser(path))


def emit(result: Any, as_json: bool, render: Callable[[Any], str] | None = None) -> None:
    """Print ``result``: as one JSON document with ``--json``, else through ``render`` (or nothing if
    ``render`` is None or returns an empty string)."""
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=False))
        return
    if render is None:
        return
    text = render(result)
    if text:
        click.echo(text, nl=not text.endswith("\n"))


def _stdout_fd() -> int:
    """stdout's file descriptor when text written there is written as its UTF-8 bytes (a UTF-8 file:
    not click's test runner or a StringIO), else -1."""
    import codecs
    try:
        utf8 = codecs.lookup(getattr(sys.stdout, "encoding", None) or "").name == "utf-8"
        return sys.stdout.fileno() if utf8 else -1
    except (AttributeError, LookupError, OSError, ValueError):
        return -1


def stream_table(pool: str, headers: bool) -> bool:
    """``thinpool ls``'s table of a pool that is not being served, written by the compiled formatter
    straight to stdout's file descriptor as it is made (no copy of the whole table in memory): what
    ``echo_text`` of the ls op's text would write.  False, with nothing written, when that cannot be
    (a served pool, a pool that needs a full open, the formatter not built, stdout not a UTF-8 file,
    or a table the Python renderer must write: the caller then asks the op)."""
    from .tables import compiled, pool_table
    fd = _stdout_fd()
    if fd < 0 or not compiled():
        return False
    from .registry import run_local

    def write(table: Any) -> bool:
        sys.stdout.flush()
        return pool_table(table, headers, fd) is not None
    return bool(run_local(pool, write))


def echo_text(text: str) -> None:
    """``click.echo(text)``, its UTF-8 bytes written to stdout's buffer when that is the same: stdout
    encodes UTF-8, and the text holds no escape character (click strips ANSI escape sequences from
    text it writes to anything but a terminal, not from bytes) and no lone surrogate: a large table
    goes out without the text layer's encoding step and its line scan, and with the compiled
    formatter built (:func:`thinpool.cli.tables.write_text`), straight from the str to stdout's file
    descriptor, no encoded copy of it."""
    import codecs
    encoding = getattr(sys.stdout, "encoding", None) or ""
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        utf8 = False
    if utf8 and "\x1b" not in text:
        from .tables import write_text
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # (not a file: click's test runner, a StringIO)
            fd = -1
        try:
            sys.stdout.flush()
            if fd >= 0 and write_text(fd, text + "\n" if len(text) < 65536 else text):
                if len(text) >= 65536:
                    write_text(fd, "\n")
                return
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # (a lone surrogate: click's text stream reports it as it would)
            pass
        else:  # (what click.echo does with bytes, without joining the newline to a copy of them)
            out = click.get_binary_stream("stdout")
            out.write(data)
            out.write(b"\n")
            out.flush()
            return
    click.echo(text)


def stderr_is_tty() -> bool:
    """True when stderr is a terminal (progress bars are shown only then)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A byte-count progress bar on stderr when it is a terminal; yields ``advance(nbytes)``.

    When stderr is not a terminal, ``advance`` does nothing (no output at all).
    """
    if not stderr_is_tty() or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def human_size(nbytes: int) -> str:
    """Binary human size (``64.0KiB``)."""
    from thinpool.units import format_size
    return format_size(nbytes)


__all__ = ["SIZE", "SizeType", "MODE", "ModeType", "mode_option", "pool_argument", "json_option", "abspath", "emit", "progress",
           "stderr_is_tty", "human_size", "CommandFn"]
