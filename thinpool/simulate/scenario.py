"""Scenarios: a TOML file describing a pool, the volumes that traces drive, their snapshot schedules
and the sampling interval (schema and a commented example: docs/simulate.md, "Scenarios").

A scenario is plain data (dicts of checked values), so it pickles to a worker process or a Dask
worker unchanged; :func:`run` replays it into a fresh pool and returns a
:class:`~thinpool.simulate.results.Result`.  Errors name the file, the key and its line.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InvalidArgument
from ..rules import check_block_size
from ..units import parse_size
from .replay_sources import Source, expected_records, open_trace, windows
from .replayer import Replayer
from .schedule import Every, Target
from .results import Result

# key -> (kind, default); kinds: size, bool, int, float, str, every, choice:<a|b>
POOL_KEYS: dict[str, tuple[str, Any]] = {
    "data_size": ("size", "64GiB"),
    "block_size": ("size", "64KiB"),
    "metadata_size": ("size", None),
    "zero_new_blocks": ("bool", True),
    "error_if_no_space": ("bool", False),
    "no_space_timeout": ("float", 60.0),
    "low_water_mark": ("int", 0),
    "discards": ("choice:passdown|nopassdown|ignore", "passdown"),
    "metadata_only": ("bool", True),
}
SIMULATION_KEYS: dict[str, tuple[str, Any]] = {
    "sample_every": ("every", None),
    "commit_on_flush": ("bool", True),
}
VOLUME_KEYS: dict[str, tuple[str, Any]] = {
    "name": ("str", None),
    "size": ("size", None),
    "trace": ("str", None),
    "format": ("str", None),
    "trace_volume": ("str", None),
    "time_offset": ("float", 0.0),
    "offset_scale": ("float", 1.0),
    "wrap": ("bool", False),
    "skip_bad": ("bool", False),
    "snapshot_every": ("every", None),
    "keep": ("int", None),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")


@dataclass
class Scenario:
    """A checked scenario: ``pool`` / ``simulation`` settings and ``volumes`` (a list of dicts), with
    every key present (defaults filled in); ``path`` is where it came from (trace paths are resolved
    against its directory)."""

    pool: dict[str, Any]
    simulation: dict[str, Any]
    volumes: list[dict[str, Any]]
    path: str = "<scenario>"
    text: str = field(default="", repr=False)

    def params(self) -> dict[str, Any]:
        """The settings as JSON-able data (what a result records)."""
        return {"pool": dict(self.pool), "simulation": dict(self.simulation),
                "volumes": [dict(v) for v in self.volumes]}

    def with_values(self, values: dict[str, Any]) -> "Scenario":
        """A copy with ``key=value`` settings applied (a sweep point): ``pool.block_size``,
        ``volume.keep`` (every volume), ``volumes.NAME.keep`` (one), or a bare key found in exactly one
        of the sections (a volume key sets every volume)."""
        s = copy.deepcopy(self)
        for key, value in values.items():
            section, name, vol = s._resolve(key)
            if section == "pool":
                s.pool[name] = _check(s.path, s.text, "pool", name, POOL_KEYS[name][0], value)
            elif section == "simulation":
                s.simulation[name] = _check(s.path, s.text, "simulation", name, SIMULATION_KEYS[name][0], value)
            else:
                for v in s.volumes:
                    if vol is None or v["name"] == vol:
                        v[name] = _check(s.path, s.text, "volume", name, VOLUME_KEYS[name][0], value)
        _check_volumes(s)
        return s

    def _resolve(self, key: str) -> tuple[str, str, str | None]:
        parts = key.split(".")
        if len(parts) == 1:
            hits = [sec for sec, keys in (("pool", POOL_KEYS), ("simulation", SIMULATION_KEYS),
                                          ("volume", VOLUME_KEYS)) if key in keys]
            if len(hits) != 1 or key in ("name", "trace"):
                raise InvalidArgument(f"sweep key {key!r}: not a scenario setting (pool.*, simulation.*, volume.*)")
            return hits[0], key, None
        if parts[0] == "pool" and len(parts) == 2 and parts[1] in POOL_KEYS:
            return "pool", parts[1], None
        if parts[0] == "simulation" and len(parts) == 2 and parts[1] in SIMULATION_KEYS:
            return "simulation", parts[1], None
        if parts[0] == "volume" and len(parts) == 2 and parts[1] in VOLUME_KEYS and parts[1] != "name":
            return "volume", parts[1], None
        if parts[0] == "volumes" and len(parts) == 3 and parts[2] in VOLUME_KEYS and parts[2] != "name":
            if parts[1] not in {v["name"] for v in self.volumes}:
                raise InvalidArgument(f"sweep key {key!r}: no volume named {parts[1]!r}")
            return "volume", parts[2], parts[1]
        raise InvalidArgument(f"sweep key {key!r}: not a scenario setting (pool.*, simulation.*, volume.*)")


def _line_of(text: str, section: str, key: str | None, index: int = 0) -> int | None:
    """The line of ``key`` in ``[section]`` (or the ``index``-th ``[[volume]]``), or of the section."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\[\s*volume\s*\]\]" if section == "volume" else rf"^\s*\[\s*{section}\s*\]")
    seen = -1
    start = None
    for i, ln in enumerate(lines):
        if header.match(ln):
            seen += 1
            if section != "volume" or seen == index:
                start = i
                break
    if start is None:
        return None
    if key is None:
        return start + 1
    pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if pat.match(lines[i]):
            return i + 1
    return start + 1


def _where(path: str, text: str, section: str, key: str | None, index: int = 0) -> str:
    line = _line_of(text, section, key, index)
    sec = f"[[volume]] #{index + 1}" if section == "volume" else f"[{section}]"
    return f"{path}:{line}: {sec} {key}" if line else f"{path}: {sec} {key}"


def _check(path: str, text: str, section: str, key: str, kind: str, value: Any, index: int = 0) -> Any:
    def bad(why: str) -> InvalidArgument:
        shown = (f"a {value.bit_length()}-bit integer" if isinstance(value, int) and value.bit_length() > 128
                 else repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "...")
        return InvalidArgument(f"{_where(path, text, section, key, index)}: {why}, got {shown}")
    if value is None:
        return None
    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("expected a size like '64KiB' or a number of bytes")
        try:
            size = parse_size(value, key)
            if key == "block_size":
                check_block_size(size)
        except InvalidArgument as exc:
            raise bad(str(exc)) from None
        if size <= 0:
            raise bad("expected a positive size")
        return size
    if kind == "bool":
        if not isinstance(value, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise bad("expected true or false")
        return value
    if kind == "int":
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() \
                and len(value.strip().lstrip("0")) <= 19:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("expected a non-negative integer")
        if value >= 1 << 63:
            raise InvalidArgument(f"{_where(path, text, section, key, index)}: {value.bit_length()}-bit integer "
                                  f"is too large (at most 2^63-1)")
        return value
    if kind == "float":
        try:
            f = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            f = None
        if f is None or f != f or f in (float("inf"), float("-inf")):
            raise bad("expected a number")
        return f
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("expected a non-empty string")
        return value
    if kind == "every":
        try:
            e = Every.parse(value, key)
        except InvalidArgument as exc:
            raise bad(str(exc).split(": ", 1)[-1].rsplit(", got ", 1)[0]) from None
        return e.as_text() if e else None
    if kind.startswith("choice:"):
        options = kind[7:].split("|")
        if value not in options:
            raise bad(f"expected one of {', '.join(options)}")
        return value
    raise AssertionError(kind)


def _section(path: str, text: str, data: Any, section: str, keys: dict, index: int = 0) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{_where(path, text, section, None, index)}: expected a table")
    out = {}
    for k, v in data.items():
        if k not in keys:
            raise InvalidArgument(f"{_where(path, text, section, k, index)}: unknown key (known: {', '.join(keys)})")
        out[k] = _check(path, text, section, k, keys[k][0], v, index)
    for k, (kind, default) in keys.items():
        out.setdefault(k, default)
    return out


def _check_volumes(s: Scenario) -> None:
    names = set()
    for i, v in enumerate(s.volumes):
        for req in ("name", "size", "trace"):
            if v.get(req) is None:
                raise InvalidArgument(f"{_where(s.path, s.text, 'volume', None, i)}: {req} is required")
        if not _NAME.match(v["name"]) or "@" in v["name"]:
            raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'name', i)}: not a usable volume name "
                                  f"(letters, digits, _.+-), got {v['name']!r}")
        if "\0" in v["trace"]:
            raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'trace', i)}: a path cannot contain NUL, "
                                  f"got {v['trace'][:80]!r}")
        if v["name"] in names:
            raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'name', i)}: duplicate volume {v['name']!r}")
        names.add(v["name"])
        if v["keep"] is not None and v["snapshot_every"] is None:
            raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'keep', i)}: keep needs snapshot_every")
        if v["offset_scale"] <= 0:
            raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'offset_scale', i)}: must be positive")
        if v["time_offset"] < 0:
            raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'time_offset', i)}: must not be negative")


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    """Check a scenario's TOML text (errors name ``path``, the key and its line)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    except ValueError:  # an integer of more than 4,300 digits (Python refuses to convert it)
        raise InvalidArgument(f"{path}: not usable TOML: an integer of more than 4,300 digits") from None
    except RecursionError:
        raise InvalidArgument(f"{path}: not usable TOML: arrays or tables nested too deeply") from None
    for k in data:
        if k not in ("pool", "simulation", "volume"):
            line = next((i + 1 for i, ln in enumerate(text.splitlines())
                         if re.match(rf"^\s*\[*\s*{re.escape(k)}\b", ln)), None)
            raise InvalidArgument(f"{path}:{line or '?'}: unknown section or key {k!r} (known: [pool], "
                                  f"[simulation], [[volume]])")
    pool = _section(path, text, data.get("pool", {}), "pool", POOL_KEYS)
    sim = _section(path, text, data.get("simulation", {}), "simulation", SIMULATION_KEYS)
    vols = data.get("volume", [])
    if not isinstance(vols, list) or not vols:
        raise InvalidArgument(f"{path}: at least one [[volume]] is required")
    volumes = [_section(path, text, v, "volume", VOLUME_KEYS, i) for i, v in enumerate(vols)]
    s = Scenario(pool, sim, volumes, path, text)
    _check_volumes(s)
    return s


def load_scenario(path: str | os.PathLike) -> Scenario:
    """Read and check a scenario file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(1 << 20 + 1)
    if len(raw) > 1 << 20:
        raise InvalidArgument(f"{path}: scenario larger than 1 MiB")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"{path}: not UTF-8 text") from None
    return parse_scenario(text, path)


def _trace_path(s: Scenario, trace: str) -> str:
    if os.path.isabs(trace) or s.path.startswith("<"):
        return trace
    return os.path.join(os.path.dirname(os.path.abspath(s.path)), trace)


def run(scenario: Scenario | str | os.PathLike, *, pool_dir: str | None = None, progress: bool | None = None,
        trace_opener: Callable[..., Any] | None = None, flush: bool | None = None) -> Result:
    """Replay a scenario into a fresh pool (in ``pool_dir``, kept, or a temporary directory removed
    afterwards) and return its :class:`~thinpool.simulate.results.Result`.  ``trace_opener(volume dict)``
    may supply trace objects (tests, notebooks); by default each volume's ``trace`` file is read.
    ``flush``: whether commits are flushed (see :func:`~thinpool.simulate.replay_file`: by default not in
    a temporary directory, yes in ``pool_dir``)."""
    from ..pool import Pool
    s = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    p = s.pool
    with contextlib.ExitStack() as stack:
        if flush is None:
            flush = pool_dir is not None
        if pool_dir is None:
            pool_dir = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="thinpool-sim-")), "pool")
        pool = Pool.create(pool_dir, data_size=p["data_size"], block_size=p["block_size"],
                           metadata_size=p["metadata_size"], low_water_mark=p["low_water_mark"],
                           zero_new_blocks=p["zero_new_blocks"], error_if_no_space=p["error_if_no_space"],
                           metadata_only=p["metadata_only"], max_thins=max(1000, 2 * len(s.volumes)),
                           discard=p["discards"], no_space_timeout=p["no_space_timeout"], flush=bool(flush))
        with pool:
            # traces opened once per distinct (file, format, skip_bad): volumes of one multi-volume trace share it
            opened: dict[tuple, tuple[Any, list[int], int]] = {}  # -> (trace, volume indices, source index)
            targets: list[Target] = []
            sources: list[Source] = []
            with pool.batch():  # one commit for all the volumes (each pool message commits otherwise)
                thins = [pool.create_thin(v["name"], v["size"]) for v in s.volumes]
            for i, v in enumerate(s.volumes):
                thin = thins[i]
                keep = v["keep"]
                targets.append(Target(thin, Every.parse(v["snapshot_every"], "snapshot_every"), keep, v["wrap"],
                                      v["offset_scale"]))
                key = (v["trace"], v["format"], v["skip_bad"], v["time_offset"])
                if key not in opened:
                    tr = trace_opener(v) if trace_opener else open_trace(_trace_path(s, v["trace"]), v["format"],
                                                                         skip_bad=v["skip_bad"])
                    opened[key] = (tr, [], len(sources))
                    sources.append(Source(tr, None, v["time_offset"], len(sources), -1))
                tr, users, si = opened[key]
                users.append(i)
            for key, (tr, users, si) in opened.items():
                src = sources[si]
                named = [s.volumes[i]["trace_volume"] for i in users]
                if len(users) == 1 and named[0] is None:
                    src.all_to = users[0]  # the whole trace drives one volume: no need to know its volumes
                    continue
                if None in named:
                    i = users[named.index(None)]
                    raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'trace_volume', i)}: trace "
                                          f"{s.volumes[i]['trace']} drives several volumes: each must name its "
                                          f"trace_volume")
                names = list(getattr(tr, "volumes", ["0"])) or ["0"]  # one parsing pass to learn them
                src.volume_map = np.full(len(names), -1, np.int64)
                for i, name in zip(users, named):
                    if name not in names:
                        raise InvalidArgument(f"{_where(s.path, s.text, 'volume', 'trace_volume', i)}: trace "
                                              f"{s.volumes[i]['trace']} has no volume {name!r} (it has: "
                                              f"{', '.join(names[:10])})")
                    src.volume_map[names.index(name)] = i
            pool.commit()
            paths = [str(getattr(src.trace, "path", "<trace>")) for src in sources]
            r = Replayer(pool, targets, sample_every=Every.parse(s.simulation["sample_every"], "sample_every"),
                         commit_on_flush=s.simulation["commit_on_flush"], on_no_space="skip", progress=progress,
                         paths=paths, expected_records=sum(expected_records(src.trace) for src in sources))
            try:
                for w in windows(sources):
                    r.feed(*w)
            finally:
                r.close()
            bad = sum(int(getattr(src.trace, "bad_records", 0) or 0) for src in sources)
            return r.finish(Result, s.params(), bad_records=bad)
