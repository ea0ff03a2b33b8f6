"""What-if simulation: replay block I/O traces through a pool and report what the pool did.

``traces.py`` reads traces (fio iolog, blkparse, MSR/SNIA CSV, plain CSV) as chunks of numpy arrays;
``replayer.py`` feeds them into the pool's batch kernel (:func:`replay`, in ``replay_volume.py``;
``replay_sources.py`` merges several traces by time, ``schedule.py`` holds the snapshot and sample
intervals), ``scenario.py`` runs a TOML scenario (:func:`run`), ``sweeps.py`` runs a scenario over a
cartesian product of settings on a process pool or a Dask cluster (:func:`sweep`), ``results.py``
holds what they report and ``report.py`` draws it.  A front end: it uses the engine's public interface only.

>>> from thinpool import Pool
>>> from thinpool.simulate import replay
>>> with Pool.create("/tmp/p", data_size="100GiB", metadata_only=True) as pool:   # doctest: +SKIP
...     pool.create_thin("vol", "100GiB")
...     r = replay(pool, "vol", "run.iolog", snapshot_every="3600s", keep=24)
...     r["cow_bytes_copied"], r.to_pandas()
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["replay", "run", "sweep", "ReplayResult", "Result", "ArrayTrace", "load_scenario", "parse_scenario"]


_WHERE = {"replay": "replay_volume", "ArrayTrace": "replay_sources", "replay_file": "replay_volume", "run": "scenario",
          "load_scenario": "scenario", "parse_scenario": "scenario", "Scenario": "scenario", "sweep": "sweeps",
          "SweepResult": "sweeps", "Result": "results", "ReplayResult": "results"}


def __getattr__(name: str) -> Any:
    # lazy: `import thinpool.simulate.traces` must not import the pool engine
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)
