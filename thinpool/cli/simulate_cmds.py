"""What-if simulation commands: replay a trace into a fresh pool, run a scenario or a sweep
(docs/simulate.md).  Both make their own pools (a temporary directory unless --pool), so they need no
op in the registry: no existing pool is touched."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from .common import CommandFn, IntRange, SIZE, abspath, stderr_is_tty

if TYPE_CHECKING:
    from thinpool.simulate.results import Result
    from thinpool.simulate.schedule import Every
    from thinpool.simulate.sweeps import SweepResult

SECTION = "Simulation"

_FORMATS = click.Choice(["fio-iolog", "blkparse", "msr", "csv"])


def _check_outputs(*paths: str | None) -> None:
    """Refuse an output onto a pool's file (:mod:`thinpool.safe_output`) before the run, not after it."""
    from thinpool.safe_output import guard_output
    for path in paths:
        if path and path != "-":
            guard_output(abspath(path))


def _outputs(result: Result | SweepResult, as_json: str | None, html_out: str | None, plot: str | None,
             series: str | None, title: str) -> None:
    if as_json:
        if as_json == "-":
            click.echo(result.to_json())
        else:
            result.to_json(abspath(as_json))
    if series:
        if hasattr(result, "runs"):
            raise click.UsageError("--series is for one run; a sweep's series are in its --json")
        result.write_series(abspath(series))
    from thinpool.simulate import report
    if plot:
        fig = report.sweep_figure(result.runs, title) if hasattr(result, "runs") else report.result_figure(result, title)
        report.save_png(fig, abspath(plot))
    if html_out:
        report.html_report(result, abspath(html_out), title)


def _summary(result: Result | SweepResult) -> None:
    from rich.console import Console
    from rich.table import Table

    from thinpool.simulate.results import summary_rows
    console = Console(highlight=False, width=None if stderr_is_tty() else 160)
    if hasattr(result, "runs"):
        t = Table("run", "data used", "peak data", "metadata", "CoW breaks", "CoW copied", "write ampl.",
                  "snapshots", "ENOSPC")
        for p, r in result.runs:
            c = r.counters
            mib = c["block_size"] / (1 << 20)
            t.add_row(", ".join(f"{k}={v}" for k, v in p.items()), f"{c['data_blocks_used'] * mib:,.0f} MiB",
                      f"{c['peak_data_blocks_used'] * mib:,.0f} MiB", f"{c['metadata_blocks_used'] * 4 / 1024:,.1f} MiB",
                      f"{c['cow_breaks']:,}", f"{c['cow_bytes_copied'] / (1 << 20):,.0f} MiB",
                      f"{c['write_amplification']:.2f}", f"{c['snapshots_taken']:,}", f"{c['enospc_events']:,}")
    else:
        t = Table("counter", "value")
        for k, v in summary_rows(result):
            t.add_row(k, v)
    console.print(t)


def _every(value: str | None, what: str) -> Every | None:
    if value is None:
        return None
    from thinpool.simulate.schedule import Every
    return Every.parse(value, what)


def _report_options(f: CommandFn) -> CommandFn:
    """The report outputs both commands take: --json, --html and --plot (see :func:`_outputs`)."""
    f = click.option("--plot", metavar="OUT.png", default=None, help="Write the plots as one PNG.")(f)
    f = click.option("--html", "html_out", metavar="OUT", default=None, help="Write a self-contained HTML report.")(f)
    return click.option("--json", "as_json", metavar="OUT", default=None,
                        help="Write the result as JSON to OUT ('-': stdout).")(f)


@click.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False, exists=True))
@click.option("--format", "fmt", type=_FORMATS, default=None, help="Trace format (default: sniffed).")
@click.option("-b", "--block-size", type=SIZE, default="64KiB", show_default=True, help="Pool data block size.")
@click.option("-s", "--data-size", type=SIZE, default="64GiB", show_default=True, help="Pool data size.")
@click.option("--volume-size", type=SIZE, default=None, help="Size of the replayed volume (default: the data size).")
@click.option("--snapshot-every", default=None, metavar="N|Ts",
              help="Snapshot the volume every N I/Os, or every T seconds of trace time (e.g. 3600s).")
@click.option("--keep", type=IntRange(min=0), default=None, help="Keep the last K scheduled snapshots.")
@click.option("--sample-every", default=None, metavar="N|Ts", help="Time-series interval (default: every 256 I/Os, coarser for a long trace, doubling so that "
                   "the series keeps at most 512 samples).")
@click.option("--metadata-only", is_flag=True, help="No data file: metadata and counters only (fast, any size).")
@click.option("--no-zero", "no_zero", is_flag=True, help="Pool without zero_new_blocks (skip_block_zeroing).")
@click.option("--no-commit-on-flush", is_flag=True, help="Do not commit at flush records (dm-thin commits).")
@click.option("--error-if-no-space", is_flag=True,
              help="Fail writes that find no data space at once (default: they wait, as dm-thin's queue_if_no_space).")
@click.option("--no-space-timeout", type=click.FloatRange(0, 86400), default=60.0, show_default=True,
              help="Trace seconds a write waits for data space (0: for ever).")
@click.option("--wrap", is_flag=True, help="Offsets past the volume's end wrap around instead of failing.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed records (counted as bad_records) instead of failing.")
@click.option("--blkparse-event", type=click.Choice(["Q", "D", "C"]), default="Q", show_default=True,
              help="blkparse traces: replay the queued (Q), issued (D) or completed (C) events.")
@click.option("--pool", "pool_dir", type=click.Path(file_okay=False), default=None,
              help="Create the pool here and keep it (default: a temporary directory, removed).")
@_report_options
@click.option("--series", metavar="FILE", default=None, help="Write the time series (.parquet or CSV).")
def replay_cmd(trace: str, fmt: str | None, block_size: int, data_size: int, volume_size: int | None,
               snapshot_every: str | None, keep: int | None, sample_every: str | None, metadata_only: bool,
               no_zero: bool, no_commit_on_flush: bool, error_if_no_space: bool, no_space_timeout: float,
               wrap: bool, skip_bad: bool, blkparse_event: str,
               pool_dir: str | None,
               as_json: str | None, html_out: str | None, plot: str | None, series: str | None) -> None:
    """Replay TRACE into one volume of a fresh pool and print what the pool did.

    \b
    Examples:
      thinpool replay run.iolog --metadata-only --snapshot-every 3600s --keep 24
      thinpool replay blk.txt --format blkparse --block-size 512K --json out.json --html out.html
    """
    from thinpool.simulate.replay_volume import replay_file
    _check_outputs(as_json, html_out, plot, series)
    result = replay_file(abspath(trace), pool_dir=abspath(pool_dir) if pool_dir else None, block_size=block_size,
                         data_size=data_size, volume_size=volume_size, metadata_only=metadata_only,
                         zero_new_blocks=not no_zero, error_if_no_space=error_if_no_space,
                         no_space_timeout=no_space_timeout, format=fmt,
                         snapshot_every=_every(snapshot_every, "--snapshot-every"), keep=keep,
                         sample_every=_every(sample_every, "--sample-every"), wrap=wrap, skip_bad=skip_bad,
                         blkparse_event=blkparse_event,
                         commit_on_flush=not no_commit_on_flush, progress=stderr_is_tty())
    _outputs(result, as_json, html_out, plot, series, f"replay of {os.path.basename(trace)}")
    if as_json != "-":
        _summary(result)


@click.command("simulate")
@click.argument("scenario", type=click.Path(dir_okay=False, exists=True))
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Run every combination of these settings (repeatable; e.g. block_size=64K,512K keep=4,24).")
@click.option("--workers", type=IntRange(1, 1024), default=1, show_default=True,
              help="Local worker processes for a sweep.")
@click.option("--dask", "dask_address", metavar="ADDRESS", default=None,
              help="Run the sweep on this Dask scheduler (e.g. tcp://10.0.0.1:8786) instead.")
@click.option("--pool", "pool_dir", type=click.Path(file_okay=False), default=None,
              help="Without --sweep: create the pool here and keep it.")
@_report_options
@click.option("--series", metavar="FILE", default=None, help="Without --sweep: write the time series.")
def simulate_cmd(scenario: str, sweeps: tuple[str, ...], workers: int, dask_address: str | None,
                 pool_dir: str | None, as_json: str | None, html_out: str | None, plot: str | None,
                 series: str | None) -> None:
    """Run the TOML SCENARIO (a pool, volumes driven by traces, snapshot schedules), or a sweep of it.

    \b
    Examples:
      thinpool simulate hourly.toml --html report.html
      thinpool simulate hourly.toml --sweep block_size=64K,256K,1M --sweep keep=4,24 --workers 2 --json runs.json
    """
    from thinpool.simulate.scenario import load_scenario, run
    _check_outputs(as_json, html_out, plot, series)
    s = load_scenario(abspath(scenario))
    title = f"simulation of {os.path.basename(scenario)}"
    result: Result | SweepResult
    if sweeps:
        if pool_dir:
            raise click.UsageError("--pool cannot be used with --sweep (every run has its own pool)")
        from thinpool.simulate.sweeps import parse_sweep, sweep
        result = sweep(s, parse_sweep(sweeps), workers=workers, dask=dask_address)
    else:
        result = run(s, pool_dir=abspath(pool_dir) if pool_dir else None, progress=stderr_is_tty())
    _outputs(result, as_json, html_out, plot, series, title)
    if as_json != "-":
        _summary(result)


COMMANDS: list[click.Command] = [replay_cmd, simulate_cmd]

__all__ = ["COMMANDS", "SECTION"]
