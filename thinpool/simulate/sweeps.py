"""Sweeps: one scenario run at every point of a cartesian product of settings, on a local process
pool (``workers``) or an existing Dask cluster (``dask``: dask.distributed, the standard engine for
this).  Each point is an independent, deterministic run in its own fresh pool, so the results are
identical whichever runs them; they come back in the order of the points.  They are handed out
longest first (by an estimate: :func:`cost_order`), so that a few workers finish together instead of one
of them ending the sweep alone with a long run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InvalidArgument
from ..safe_output import write_output
from .results import Result
from .scenario import Scenario, load_scenario, run
from .schedule import Every

if TYPE_CHECKING:  # an optional dependency (the simulate extra)
    import pandas

#: most runs a sweep may have (the product of its value lists' lengths)
MAX_RUNS = 10_000


def parse_sweep(items: Sequence[str]) -> dict[str, list[str]]:
    """``["block_size=64K,512K", "keep=4,24"]`` -> ``{"block_size": ["64K", "512K"], "keep": ["4", "24"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise InvalidArgument(f"--sweep {item!r}: expected KEY=VALUE[,VALUE...]")
        if key in out:
            raise InvalidArgument(f"--sweep {key}: given twice")
        out[key] = vals
    return out


def points(scenario: Scenario, sweeps: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``sweeps`` (first key varies slowest), each point checked against the
    scenario's schema now, before anything runs."""
    keys = list(sweeps)
    runs = math.prod(len(sweeps[k]) for k in keys)  # counted before the product is built
    if runs > MAX_RUNS:
        raise InvalidArgument(f"a sweep of {runs:,} runs is too many (at most {MAX_RUNS:,})")
    pts = [dict(zip(keys, combo)) for combo in itertools.product(*(sweeps[k] for k in keys))]
    for p in pts:
        scenario.with_values(p)
    return pts


def cost_order(scenario: Scenario, pts: list[dict[str, Any]]) -> list[int]:
    """The indices of ``pts`` in the order to hand them out: the likely longest runs first.

    The estimate is only an order, never a result: the blocks the volumes span (volume size / block
    size: more blocks, more leaves to shadow, commit and release), then how often snapshots are taken
    (per I/O, or per trace second), then how many are kept.  Points it cannot tell apart keep the
    order of the product."""
    def key(i: int) -> tuple[float, float, int]:
        s = scenario.with_values(pts[i])
        bs = s.pool["block_size"]
        blocks = sum(-(-v["size"] // bs) for v in s.volumes)
        rate = 0.0
        for v in s.volumes:
            e = Every.parse(v["snapshot_every"], "snapshot_every")
            if e is not None:
                period = e.ios if e.ios is not None else e.seconds
                assert period is not None, "an Every is a number of I/Os or of seconds"
                rate += 1.0 / period
        keep = sum(v["keep"] or 0 for v in s.volumes)
        return (-blocks, -rate, -keep)
    return sorted(range(len(pts)), key=key)


def run_point(scenario: Scenario, values: dict[str, Any]) -> dict[str, Any]:
    """One sweep point: the scenario with ``values`` applied, run in a fresh temporary pool; the result
    as a dict (what crosses a process or the network)."""
    return run(scenario.with_values(values)).to_dict()


@dataclass
class SweepResult:
    """Every point's settings and result, in the order of :func:`points`."""

    runs: list[tuple[dict[str, Any], Result]]

    def to_dict(self) -> dict[str, Any]:
        """``{"runs": [{"params": settings, "result": Result.to_dict()}, ...]}`` (JSON-ready)."""
        return {"runs": [{"params": p, "result": r.to_dict()} for p, r in self.runs]}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text of :meth:`to_dict` (written to ``path`` too when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            write_output(path, text + "\n", what="JSON output")
        return text

    def to_pandas(self) -> pandas.DataFrame:
        """One row per run: the swept settings, then every counter (pandas is optional: InvalidArgument
        naming the extra to install when it is missing, as :meth:`Result.to_pandas`)."""
        try:
            import pandas as pd
        except ImportError:
            raise InvalidArgument("to_pandas needs pandas (pip install 'thinpool[simulate]')") from None
        rows = []
        for p, r in self.runs:
            row = dict(p)
            row.update({k: v for k, v in r.counters.items()})
            rows.append(row)
        return pd.DataFrame(rows)


def sweep(scenario: Scenario | str | os.PathLike, sweeps: dict[str, list[Any]], *, workers: int = 1,
          dask: Any = None) -> SweepResult:
    """Run ``scenario`` at every point of ``sweeps`` (key -> values; keys as in
    :meth:`Scenario.with_values`).  ``workers`` > 1 runs them on a local process pool; ``dask`` -- a
    scheduler address (``"tcp://host:8786"``) or a ``distributed.Client`` -- runs them on that Dask
    cluster instead."""
    s = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 1024:
        raise InvalidArgument(f"workers must be 1..1024, got {workers!r}")
    pts = points(s, sweeps)
    if dask is not None or (workers > 1 and len(pts) > 1):
        order = cost_order(s, pts)  # longest first: the last runs handed out are the short ones
        todo = [pts[i] for i in order]
        if dask is not None:
            done = _on_dask(dask, s, todo)
        else:
            _warm_kernels()  # forked workers inherit the compiled kernels instead of each loading them
            with ProcessPoolExecutor(max_workers=min(workers, len(pts))) as ex:
                done = list(ex.map(run_point, [s] * len(todo), todo))
        dicts: list[dict[str, Any]] = [{}] * len(pts)
        for i, d in zip(order, done):
            dicts[i] = d
    else:
        dicts = [run_point(s, p) for p in pts]
    return SweepResult([(p, Result.from_dict(d)) for p, d in zip(pts, dicts)])


def _warm_kernels() -> None:
    """Run a one-record replay in a throwaway metadata-only pool: numba's kernels get loaded (or
    compiled) once, here, before the worker processes are forked."""
    import tempfile

    import numpy as np

    from .replay_sources import ArrayTrace
    from .replay_volume import replay_file
    with tempfile.TemporaryDirectory(prefix="thinpool-warm-") as d:
        replay_file(ArrayTrace(np.ones(1, np.uint8), [0], [4096]), pool_dir=os.path.join(d, "p"),
                    data_size="1MiB", metadata_only=True)


def _on_dask(dask: Any, s: Scenario, pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        from distributed import Client
    except ImportError:
        raise InvalidArgument("--dask needs dask.distributed (pip install 'thinpool[dask]')") from None
    own = not isinstance(dask, Client)
    client = Client(dask) if own else dask
    try:
        futures = client.map(run_point, [s] * len(pts), pts, pure=False)
        return client.gather(futures)
    finally:
        if own:
            client.close()
