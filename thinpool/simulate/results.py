"""What a replay or a scenario run reports: counters at the end, the same counters sampled along the
trace (the time series), per-volume block accounting, and conversions (JSON, pandas, pyarrow, CSV,
Parquet).

The keys are a contract (docs/simulate.md, "Results"): tests and users rely on them.  pandas and
pyarrow are optional: only the conversions that need them import them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgument
from ..safe_output import check_path, write_output

if TYPE_CHECKING:  # optional dependencies (the simulate extra)
    import pandas
    import pyarrow

#: counters every result carries, in this order (the JSON keys besides ``series`` and ``volumes``)
COUNTERS = ("ios", "reads", "writes", "discards", "flushes", "bytes_read", "bytes_written", "block_size",
            "data_blocks_used", "peak_data_blocks_used", "metadata_blocks_used", "provisioned_blocks",
            "cow_breaks", "cow_bytes_copied", "zeroed_bytes", "data_bytes_written", "write_amplification",
            "snapshots_taken", "snapshots_deleted", "enospc_events", "low_water_events", "mode_changes",
            "queued_writes", "eio_events", "snapshots_failed", "bad_records")

#: columns of the time series: where along the trace, then the counters as they stood there
SERIES_COLUMNS = ("io", "time") + tuple(c for c in COUNTERS if c not in ("block_size", "bad_records"))


def write_amplification(data_bytes_written: int, bytes_written: int) -> float:
    """data_bytes_written / bytes_written (0.0 when nothing was written)."""
    return data_bytes_written / bytes_written if bytes_written else 0.0


@dataclass
class Result:
    """The outcome of :func:`thinpool.simulate.run` (a scenario) -- and the base of
    :class:`ReplayResult`.

    ``counters``: the keys of :data:`COUNTERS`; ``series``: column name -> list (one entry per sample,
    columns :data:`SERIES_COLUMNS`); ``volumes``: volume name -> mapped / exclusive / shared blocks at
    the end; ``params``: the settings it ran with (JSON-able).
    """

    counters: dict[str, Any]
    series: dict[str, list] = field(default_factory=dict)
    volumes: dict[str, dict[str, int]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.counters[key]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every counter at the top level, plus ``series``, ``volumes`` and ``params``."""
        out = dict(self.counters)
        out["series"] = self.series
        out["volumes"] = self.volumes
        out["params"] = self.params
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        """The inverse of :meth:`to_dict`."""
        return cls({k: d[k] for k in COUNTERS if k in d}, dict(d.get("series", {})), dict(d.get("volumes", {})),
                   dict(d.get("params", {})))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text (written to ``path`` too when given)."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        if path is not None:
            write_output(path, text + "\n", what="JSON output")
        return text

    def to_pandas(self) -> pandas.DataFrame:
        """The time series as a ``pandas.DataFrame`` (one row per sample; pandas is optional)."""
        try:
            import pandas as pd
        except ImportError:
            raise InvalidArgument("to_pandas needs pandas (pip install 'thinpool[simulate]')") from None
        return pd.DataFrame({k: np.asarray(v) for k, v in self.series.items()})

    def to_arrow(self) -> pyarrow.Table:
        """The time series as a ``pyarrow.Table`` (pyarrow is optional)."""
        try:
            import pyarrow as pa
        except ImportError:
            raise InvalidArgument("to_arrow needs pyarrow (pip install 'thinpool[simulate]')") from None
        return pa.table({k: np.asarray(v) for k, v in self.series.items()})

    def write_series(self, path: str | os.PathLike) -> None:
        """Write the time series to ``path``: Parquet when it ends in ``.parquet`` (pyarrow), else CSV.
        Like every output a user names, it is never a pool's file (:mod:`thinpool.safe_output`)."""
        path = check_path(path, "series output")
        if path.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq
            sink = pa.BufferOutputStream()
            pq.write_table(self.to_arrow(), sink)
            write_output(path, sink.getvalue().to_pybytes(), what="series output")
            return
        cols = list(self.series)
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(cols)
        w.writerows(zip(*(self.series[c] for c in cols)))
        write_output(path, text.getvalue(), what="series output")


@dataclass
class ReplayResult(Result):
    """The outcome of :func:`thinpool.simulate.replay`: one trace into one volume."""


def summary_rows(result: Result) -> list[tuple[str, str]]:
    """(counter, formatted value) rows for a summary table."""
    rows = []
    for k in COUNTERS:
        v = result.counters.get(k)
        if v is None:
            continue
        rows.append((k, f"{v:.3f}" if isinstance(v, float) else f"{v:,}"))
    return rows
