"""Pictures and reports of replays, scenario runs and sweeps: matplotlib PNGs and one self-contained
HTML file (plots embedded as base64, one file to mail).  matplotlib is optional: imported only here.

One run: data and metadata use over trace time, copy-on-write bytes per sampling interval, write
amplification, and per-volume exclusive vs shared blocks.  A sweep: the configurations side by side.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgument
from ..safe_output import check_path, write_output
from .results import COUNTERS, Result, summary_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgument("plots need matplotlib (pip install 'thinpool[simulate]')") from None
    return plt


def _mib(blocks: Any, bs: int) -> np.ndarray:
    return np.asarray(blocks, np.float64) * bs / (1 << 20)


def result_figure(result: Result, title: str = "") -> Figure:
    """A 2x2 matplotlib figure of one run."""
    plt = _plt()
    s = result.series
    bs = int(result.counters.get("block_size", 1))
    t = np.asarray(s.get("time", []), np.float64)
    x, xlabel = (t, "trace time (s)") if len(t) and t[-1] > t[0] else (np.asarray(s.get("io", []), np.float64),
                                                                       "I/Os replayed")
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0, 0]
    a.plot(x, _mib(s.get("data_blocks_used", []), bs), label="data used")
    a.set_ylabel("data (MiB)")
    a.set_xlabel(xlabel)
    size = result.params.get("data_size") or (result.params.get("pool") or {}).get("data_size")
    if isinstance(size, int) and size > 0:
        a.axhline(size / (1 << 20), color="tab:red", linestyle="--", linewidth=1, label="pool data size")
    enospc = np.asarray(s.get("enospc_events", []), np.float64)
    if len(enospc) and enospc[-1] > 0:
        first = int(np.argmax(enospc > 0))
        a.axvline(x[first], color="tab:red", linewidth=1, label=f"first ENOSPC (by {xlabel.split(' (')[0]} "
                                                                 f"{x[first]:,.4g})")
    a2 = a.twinx()
    a2.plot(x, np.asarray(s.get("metadata_blocks_used", []), np.float64) * 4 / 1024, color="tab:orange",
            label="metadata used")
    a2.set_ylabel("metadata (MiB)")
    a.set_title("pool space in use")
    a.legend(handles=a.get_lines() + a2.get_lines(), loc="lower right", fontsize="small")
    a = ax[0, 1]
    cow = np.diff(np.asarray(s.get("cow_bytes_copied", []), np.float64), prepend=0.0) / (1 << 20)
    zero = np.diff(np.asarray(s.get("zeroed_bytes", []), np.float64), prepend=0.0) / (1 << 20)
    a.step(x, cow, where="post", label="copied by CoW breaks")
    a.step(x, zero, where="post", label="zeroed (new blocks)")
    a.set_title("copy-on-write and zeroing per sampling interval")
    a.set_ylabel("MiB")
    a.set_xlabel(xlabel)
    a.legend(fontsize="small")
    a = ax[1, 0]
    a.plot(x, np.asarray(s.get("write_amplification", []), np.float64))
    a.set_title("write amplification (data device bytes / bytes written)")
    a.set_xlabel(xlabel)
    a = ax[1, 1]
    names = list(result.volumes)[:40]
    ex = [result.volumes[n]["exclusive_blocks"] for n in names]
    sh = [result.volumes[n]["shared_blocks"] for n in names]
    pos = np.arange(len(names))
    a.bar(pos, _mib(ex, bs), label="exclusive")
    a.bar(pos, _mib(sh, bs), bottom=_mib(ex, bs), label="shared")
    a.set_xticks(pos, names, rotation=60, ha="right", fontsize="small")
    a.set_ylabel("MiB")
    a.set_title("per volume at the end: exclusive vs shared")
    a.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


SWEEP_METRICS = ("peak_data_blocks_used", "data_blocks_used", "cow_bytes_copied", "write_amplification",
                 "metadata_blocks_used", "enospc_events")


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def sweep_figure(runs: list[tuple[dict[str, Any], Result]], title: str = "") -> Figure:
    """The sweep's configurations side by side, one panel per metric (space in MiB)."""
    plt = _plt()
    fig, ax = plt.subplots(2, 3, figsize=(13, 7.5))
    labels = [_label(p) for p, _ in runs]
    pos = np.arange(len(runs))
    for a, m in zip(ax.flat, SWEEP_METRICS):
        vals = []
        for _, r in runs:
            v = float(r.counters.get(m, 0))
            if m.endswith("_blocks_used") and m != "metadata_blocks_used":
                v = v * r.counters["block_size"] / (1 << 20)
            elif m == "metadata_blocks_used":
                v = v * 4 / 1024
            elif m.endswith("_bytes_copied"):
                v = v / (1 << 20)
            vals.append(v)
        a.bar(pos, vals, color="tab:blue")
        unit = " (MiB)" if m != "write_amplification" and m != "enospc_events" else ""
        a.set_title(m.replace("_", " ") + unit, fontsize="medium")
        a.set_xticks(pos, labels, rotation=60, ha="right", fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Write a figure as PNG (never onto a pool's file: :mod:`thinpool.safe_output`)."""
    check_path(path, "PNG output")
    write_output(path, _png(fig), what="PNG output")


def _table(rows: list[list[str]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}img{max-width:100%}")


def html_report(result: Result | Any, path: str | os.PathLike, title: str = "thinpool simulation") -> None:
    """One self-contained HTML file: the summary table(s) and the plots embedded (``result``: a
    :class:`Result` or a :class:`~thinpool.simulate.sweep.SweepResult`)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if hasattr(result, "runs"):
        runs = result.runs
        keys = [k for k in COUNTERS if k not in ("block_size",)]
        rows = [[_label(p)] + [f"{r.counters.get(k, 0):,.3f}" if isinstance(r.counters.get(k), float)
                               else f"{r.counters.get(k, 0):,}" for k in keys] for p, r in runs]
        parts.append("<h2>Configurations</h2>" + _table(rows, ["run"] + keys))
        parts.append(_img(sweep_figure(runs), "the configurations side by side"))
        for p, r in runs:
            parts.append(f"<h2>{html.escape(_label(p))}</h2>")
            parts.append(_img(result_figure(r), _label(p)))
    else:
        parts.append("<h2>Summary</h2>" + _table([[k, v] for k, v in summary_rows(result)], ["counter", "value"]))
        if result.params:
            parts.append("<h2>Settings</h2>" + _table([[k, str(v)] for k, v in result.params.items()],
                                                      ["setting", "value"]))
        parts.append(_img(result_figure(result), "the run"))
    parts.append("</body></html>")
    write_output(path, "\n".join(parts), what="HTML output")


def _img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(_png(fig)).decode()
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"
