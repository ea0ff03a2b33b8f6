"""Trace replay: feed trace chunks straight into the pool's batch kernel, with snapshot schedules,
commits at flushes and samples of the counters along the trace.

The hot path is vectorised: a chunk (about a million records) is cut only where something must
happen between two records -- a flush (dm-thin commits), a scheduled snapshot, a sample -- and every
run between two cuts is one :func:`thinpool.thin.apply_io` call, whatever its length.  Records of
several traces (a scenario's volumes) arrive merged by trace time, window by window
(:mod:`.replay_sources`); the entry points are in :mod:`.replay_volume` (one volume) and
:mod:`.scenario` (several).
"""

from __future__ import annotations

import sys
import time as _time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from ..errors import InvalidArgument
from ..thin import apply_io
from .results import COUNTERS, SERIES_COLUMNS, ReplayResult, Result, write_amplification
from .schedule import Every, Target

if TYPE_CHECKING:
    from ..batch_io import BatchOutcome
    from ..pool import Pool

#: most snapshots or samples a time schedule may put in one window of records (see Replayer._time_marks)
MAX_MARKS = 1_000_000

OP_READ, OP_WRITE, OP_DISCARD, OP_FLUSH = 0, 1, 2, 3
#: I/Os between samples when no sampling interval is given: the interval starts here (or coarser for a
#: long trace, from its size) and doubles (every other sample dropped) whenever the series reaches
#: MAX_AUTO_SAMPLES rows
DEFAULT_SAMPLE_IOS = 256
MAX_AUTO_SAMPLES = 512


# --------------------------------------------------------------------------- the replayer
class Replayer:
    """Replays merged record windows into a pool (see the module docstring); :meth:`finish` -> Result."""

    def __init__(self, pool: Pool, targets: list[Target], *, sample_every: Every | None = None,
                 commit_on_flush: bool = True, on_no_space: str = "skip", pattern: np.ndarray | None = None,
                 progress: bool | None = None, paths: Sequence[str] = (), expected_records: int = 0) -> None:
        if not targets:
            raise InvalidArgument("nothing to replay into: no volume")
        self.pool = pool
        self.targets = targets
        self.thins = [t.thin for t in targets]
        self.sizes = np.array([t.thin.size for t in targets], np.int64)
        self.auto_sample = sample_every is None
        start = DEFAULT_SAMPLE_IOS
        while start * MAX_AUTO_SAMPLES // 2 < expected_records:  # a long trace starts coarser (each sample ~1 ms)
            start *= 2
        self.sample_every = sample_every or Every(ios=start)
        self.commit_on_flush = commit_on_flush
        self.on_no_space = on_no_space
        self.pattern = pattern
        # dm-thin's ignore_discard: the thin devices do not support discards, so none reaches the pool
        self.ignore_discards = getattr(pool, "discard_mode", "passdown") == "ignore"
        self.paths = list(paths) or ["<trace>"]
        # the counters of COUNTERS (counts; write_amplification, a ratio, only in what _derived returns)
        self.c = dict.fromkeys(COUNTERS, 0)
        self.c["block_size"] = pool.block_size
        self.series: dict[str, list] = {k: [] for k in SERIES_COLUMNS}
        self.start_io = dict(pool.io_counters())
        self.start_time: float | None = None
        self.last_time = 0.0
        self.mode = pool.mode
        self.failed_bytes = 0
        # queue_if_no_space in trace time (see _failed): writes waiting for space, as (target, offset,
        # length) arrays; when the pool entered out-of-data-space (trace seconds); whether the
        # no_space_timeout has passed since (then writes fail at once until the pool leaves the mode)
        feats = getattr(pool, "features", {})
        self.queueing = on_no_space == "skip" and not feats.get("error_if_no_space", True)
        self.no_space_timeout = float(feats.get("no_space_timeout", 60.0))
        self.queue: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_bytes = 0
        self.out_since: float | None = None
        self.expired = False
        self.peak = pool.status().used_data_blocks
        self._bar = _Progress(progress)
        self._orig_lwm = pool.on_low_water

        def on_low_water(p: Pool) -> None:
            self.c["low_water_events"] += 1
            if self._orig_lwm is not None:
                self._orig_lwm(p)
        pool.on_low_water = on_low_water

    # -- one window of merged records: arrays time, op, offset, length, tgt (target index), line, src
    def feed(self, time: np.ndarray, op: np.ndarray, offset: np.ndarray, length: np.ndarray, tgt: np.ndarray,
             line: np.ndarray, src: np.ndarray) -> None:
        n = len(op)
        if n == 0:
            return
        offset, length = self._map_offsets(op, offset, length, tgt, line, src)
        base_io = self.c["ios"]
        events = self._events(time, op, tgt, base_io)
        if self.start_time is None:
            self.start_time = float(time[0])
            self._sample()  # the state before the first record
        keep = op != OP_FLUSH  # flushes reach the pool as commits (events), not as I/Os
        if self.ignore_discards:
            keep &= op != OP_DISCARD
        every = bool(keep.all())
        cum = _Cumulative(op, length) if events else None
        at: dict[int, list[tuple[int, str, int]]] = {}
        if events:
            kept_before = np.zeros(n + 1, np.int64)
            np.cumsum(keep, out=kept_before[1:])
            for pos, _order, kind, arg in events:
                at.setdefault(int(kept_before[pos]), []).append((pos, kind, arg))

        peak0 = self.peak
        widx = None if every else np.flatnonzero(keep)  # batch position -> window position
        seen = [0, 0, 0]  # failed writes, refused writes and their bytes already accounted

        def progress(so_far: BatchOutcome, now: float) -> None:
            self.peak = max(peak0, so_far.peak_data_blocks_used)
            self.c["eio_events"] += so_far.refused_writes - seen[1]
            self.failed_bytes += so_far.refused_bytes - seen[2]
            seen[1], seen[2] = so_far.refused_writes, so_far.refused_bytes
            assert so_far.failed_at is not None  # (apply_io's outcomes carry it)
            new = so_far.failed_at[seen[0]:so_far.failed_writes]
            seen[0] = so_far.failed_writes
            if len(new):
                pos = new if widx is None else widx[new]
                self._failed(tgt[pos], offset[pos], length[pos], time[pos])
            self._expire(now)

        def on_cut(pf: int, so_far: BatchOutcome) -> None:
            for pos, kind, arg in at[pf]:
                every = self.sample_every.ios
                if kind == "sample" and self.auto_sample and every and (base_io + pos) % every:
                    continue  # the adaptive interval doubled since this window's events were placed
                now = float(time[pos - 1]) if pos else self.last_time
                progress(so_far, now)
                self._account(cum, pos, base_io, time, n)
                if kind == "commit":
                    self.pool.commit()
                elif kind == "snap":
                    self._snapshot(self.targets[arg])
                elif kind == "sample":
                    self._sample()
                self._retry(now)
                self._check_mode()

        def on_space(pf: int, so_far: BatchOutcome) -> None:
            now = float(time[pf - 1] if widx is None else time[widx[pf - 1]])
            progress(so_far, now)
            self._retry(now)

        if every:
            args = (tgt, op, offset, length)
        else:
            args = (tgt[keep], op[keep], offset[keep], length[keep])
        out = apply_io(self.thins, *args, pattern=self.pattern, on_no_space=self.on_no_space, cuts=sorted(at),
                       on_cut=on_cut, on_space=on_space if self.queueing else None)
        progress(out, float(time[-1]))
        self._account(None, n, base_io, time, n, final=(op, length))
        for t, cnt in zip(*np.unique(tgt, return_counts=True)):
            self.targets[int(t)].ios += int(cnt)
        self._check_mode()
        self._bar.advance(n, float(time[-1]))

    def _map_offsets(self, op, offset, length, tgt, line, src):
        if int(op.max()) == OP_FLUSH or any(t.offset_scale != 1.0 for t in self.targets):
            offset = offset.copy()
            length = length.copy()
            flush = op == OP_FLUSH
            offset[flush] = 0
            length[flush] = 0
        elif int((offset + length).max()) <= int(self.sizes.min()) and int(offset.min()) >= 0:
            return offset, length  # nothing to map (the common case): no copies
        else:
            offset = offset.copy()
            length = length.copy()
        single = len(self.targets) == 1
        for i, t in enumerate(self.targets):
            m = np.ones(len(op), bool) if single else tgt == i
            if t.offset_scale != 1.0:
                scaled = offset[m] * t.offset_scale
                huge = ~(scaled < 2.0 ** 62)  # no volume is that large, and int64 would overflow
                if huge.any():
                    j = int(np.flatnonzero(m)[np.flatnonzero(huge)[0]])
                    raise InvalidArgument(
                        f"{self.paths[int(src[j])]}:{int(line[j])}: offset {int(offset[j])} times offset_scale "
                        f"{t.offset_scale:g} of volume {t.thin.name!r} is past 2^62 bytes")
                offset[m] = scaled.astype(np.int64) // 512 * 512
            size = int(self.sizes[i])
            end = offset + length
            over = m & (end > size)
            if not over.any():
                continue
            if not t.wrap:
                j = int(np.flatnonzero(over)[0])
                raise InvalidArgument(
                    f"{self.paths[int(src[j])]}:{int(line[j])}: I/O at offset {int(offset[j])} length {int(length[j])} "
                    f"goes past the end of volume {t.thin.name!r} ({size} bytes); use --wrap or a larger --volume-size")
            if (length[over] > size).any():
                j = int(np.flatnonzero(over & (length > size))[0])
                raise InvalidArgument(f"{self.paths[int(src[j])]}:{int(line[j])}: I/O of {int(length[j])} bytes is "
                                      f"larger than volume {t.thin.name!r} ({size} bytes)")
            o = offset[over] % size
            cross = o + length[over] > size
            o[cross] = (size - length[over][cross]) // 512 * 512
            offset[over] = o
        return offset, length

    def _events(self, time: np.ndarray, op: np.ndarray, tgt: np.ndarray, base_io: int
                ) -> list[tuple[int, int, str, int]]:
        n = len(op)
        ev: list[tuple[int, int, str, int]] = []
        if self.commit_on_flush:
            ev.extend((int(i) + 1, 0, "commit", 0) for i in np.flatnonzero(op == OP_FLUSH))
        for k, t in enumerate(self.targets):
            s = t.snapshot_every
            if s is None:
                continue
            if s.ios is not None:
                idx = np.flatnonzero(tgt == k)
                first = (t.ios // s.ios + 1) * s.ios  # the next multiple of the target's I/O count
                for c in range(first, t.ios + len(idx) + 1, s.ios):
                    ev.append((int(idx[c - t.ios - 1]) + 1, 1, "snap", k))
            else:
                assert s.seconds is not None, "an Every is a number of I/Os or of seconds"
                ev.extend((p, 1, "snap", k) for p in self._time_marks(time, s.seconds, ("snap", k)))
        s = self.sample_every
        if s.ios is not None:
            first = (base_io // s.ios + 1) * s.ios
            ev.extend((c - base_io, 2, "sample", 0) for c in range(first, base_io + n + 1, s.ios))
        else:
            assert s.seconds is not None, "an Every is a number of I/Os or of seconds"
            ev.extend((p, 2, "sample", 0) for p in self._time_marks(time, s.seconds, ("sample", 0)))
        ev.sort()
        return ev

    _marks: dict

    def _time_marks(self, time: np.ndarray, every: float, key: tuple[str, int]) -> list[int]:
        """Positions (before record p) where trace time reaches the next multiples of ``every``.

        The multiples are counted, not summed (a sum stops growing once the interval is below its
        precision: 1e-9 s on a trace 10^10 s long looped for ever), and at most :data:`MAX_MARKS` of
        them fall in one window of records: an interval of a microsecond on a trace that spans 10^6 s
        would otherwise make 10^12 snapshots or samples (InvalidArgument naming the interval)."""
        if not hasattr(self, "_marks"):
            self._marks = {}
        k = self._marks.get(key, 1)  # the index of the next multiple of ``every`` not reached yet
        last = float(time[-1])
        ratio = last / every
        if ratio < k:
            return []
        if not ratio < k + MAX_MARKS:
            what, plural = ("snapshot_every", "snapshots") if key[0] == "snap" else ("sample_every", "samples")
            raise InvalidArgument(f"{what} of {every:g} s: more than {MAX_MARKS:,} {plural} between trace times "
                                  f"{(k - 1) * every:g} and {last:g} s; give a longer interval")
        hi = int(ratio)
        marks = np.arange(k, hi + 1, dtype=np.float64) * every
        self._marks[key] = hi + 1
        return np.searchsorted(time, marks, side="left").tolist()

    def _account(self, cum: _Cumulative | None, pos: int, base_io: int, time: np.ndarray, n: int,
                 final: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Bring the record counters to position ``pos`` of the window."""
        c = self.c
        if final is not None:
            op, length = final
            if cum is None:
                cum = _Cumulative(op, length)
        assert cum is not None, "a cut comes with its window's counts (only the last call makes them)"
        r, w, d, f, br, bw = cum.at(pos)
        c["ios"] = base_io + pos
        c["reads"], c["writes"], c["discards"], c["flushes"] = (self._base[0] + r, self._base[1] + w,
                                                                self._base[2] + d, self._base[3] + f)
        c["bytes_read"], c["bytes_written"] = self._base[4] + br, self._base[5] + bw
        if pos > 0:
            self.last_time = float(time[pos - 1])
        if final is not None:
            self._base = (c["reads"], c["writes"], c["discards"], c["flushes"], c["bytes_read"], c["bytes_written"])

    _base = (0, 0, 0, 0, 0, 0)

    def _snapshot(self, t: Target) -> None:
        pool = self.pool
        if pool.mode in ("read-only", "out-of-metadata-space"):
            self.c["snapshots_failed"] += 1  # dm-thin refuses pool messages in these modes (EOPNOTSUPP)
            return
        t.snaps += 1
        names = pool.catalog["volumes"]
        while f"{t.thin.name}@{t.snaps}" in names:  # an earlier replay into this volume took that name
            t.snaps += 1
        name = f"{t.thin.name}@{t.snaps}"
        # two pool messages, each committing as dm-thin's do: the snapshot's commit carries the writes
        # since the last one, the delete's the released nodes (no batch: the metadata after each
        # message is the kernel's)
        pool.snapshot(t.thin.name, name)
        t.taken.append(name)
        self.c["snapshots_taken"] += 1
        while t.keep is not None and len(t.taken) > t.keep:
            pool.delete(t.taken.pop(0))
            self.c["snapshots_deleted"] += 1

    # -- queue_if_no_space in trace time
    def _failed(self, tgt: np.ndarray, off: np.ndarray, ln: np.ndarray, t: np.ndarray, new: bool = True) -> None:
        """Writes that found no data space (in order; ``t`` their trace times).  Under error_if_no_space
        they fail (``enospc_events``).  Under queue_if_no_space they wait (``queued_writes``) from the
        pool's entry into out-of-data-space for its ``no_space_timeout`` of trace time; those failing
        once it has passed fail at once, as the kernel's do until the pool leaves the mode."""
        if not self.queueing:
            self.c["enospc_events"] += len(tgt)
            self.failed_bytes += int(ln.sum())
            return
        if self.out_since is None:
            self.out_since = float(t[0])
        if self.expired:
            k = 0
        elif self.no_space_timeout > 0:
            k = int(np.searchsorted(t, self.out_since + self.no_space_timeout, side="left"))
        else:
            k = len(t)  # no_space_timeout 0: queued for ever
        if k:
            self.queue.append((np.array(tgt[:k], np.int64), np.array(off[:k], np.int64), np.array(ln[:k], np.int64)))
            self.pending_bytes += int(ln[:k].sum())
            if new:
                self.c["queued_writes"] += k
        if k < len(t):
            self._expire(float(t[k]))
            self.c["enospc_events"] += len(t) - k
            self.failed_bytes += int(ln[k:].sum())

    def _expire(self, now: float) -> None:
        """At trace time ``now``: once the no_space_timeout has passed since the pool ran out of space,
        every queued write fails (dm-thin's do_no_space_timeout)."""
        if (self.out_since is None or self.expired or self.no_space_timeout <= 0
                or now < self.out_since + self.no_space_timeout):
            return
        self.expired = True
        self.c["enospc_events"] += sum(len(q[0]) for q in self.queue)
        self.failed_bytes += self.pending_bytes
        self.queue, self.pending_bytes = [], 0

    def _retry(self, now: float) -> None:
        """The pool is in write mode again (a commit found free blocks): the queued writes are retried,
        in their order (dm-thin's requeue_bios); those that find no space again wait again."""
        if self.pool.mode != "write":
            return
        self.out_since, self.expired = None, False
        if not self.queue:
            return
        tgt, off, ln = (np.concatenate(c) for c in zip(*self.queue))
        self.queue, self.pending_bytes = [], 0
        out = apply_io(self.thins, tgt, np.ones(len(tgt), np.uint8), off, ln, pattern=self.pattern,
                       on_no_space="skip")
        self.peak = max(self.peak, out.peak_data_blocks_used)
        self.c["eio_events"] += out.refused_writes
        self.failed_bytes += out.refused_bytes
        if out.failed_writes:
            f = out.failed_at
            assert f is not None, "apply_io gives the positions of the writes that failed"
            self._failed(tgt[f], off[f], ln[f], np.full(len(f), now), new=False)

    def _check_mode(self) -> None:
        if self.pool.mode != self.mode:
            self.c["mode_changes"] += 1
            self.mode = self.pool.mode

    def _derived(self) -> dict[str, Any]:
        """The counters as they stand now (a dict of its own), the pool's figures brought up to date."""
        c = self.c
        st = self.pool.status()
        io = self.pool.io_counters()
        c["data_blocks_used"] = st.used_data_blocks
        self.peak = max(self.peak, st.used_data_blocks)
        c["peak_data_blocks_used"] = self.peak
        c["metadata_blocks_used"] = st.used_metadata_blocks
        for k in ("provisioned_blocks", "cow_breaks", "cow_bytes_copied", "zeroed_bytes"):
            c[k] = io[k] - self.start_io[k]
        payload = c["bytes_written"] - self.failed_bytes - self.pending_bytes
        c["data_bytes_written"] = payload + c["cow_bytes_copied"] + c["zeroed_bytes"]
        out: dict[str, Any] = dict(c)  # (in COUNTERS' order)
        out["write_amplification"] = write_amplification(c["data_bytes_written"], c["bytes_written"])
        return out

    def _sample(self) -> None:
        c = self._derived()
        self.series["io"].append(c["ios"])
        self.series["time"].append(self.last_time)
        for k in SERIES_COLUMNS[2:]:
            self.series[k].append(c[k])
        if self.auto_sample and len(self.series["io"]) >= MAX_AUTO_SAMPLES:
            every = 2 * (self.sample_every.ios or DEFAULT_SAMPLE_IOS)
            keep = [i for i, io in enumerate(self.series["io"]) if io % every == 0]
            for k, col in self.series.items():
                self.series[k] = [col[i] for i in keep]
            self.sample_every = Every(ios=every)

    def close(self) -> None:
        """Stop the progress bar and give the pool its low-water callback back (idempotent)."""
        self._bar.close()
        self.pool.on_low_water = self._orig_lwm

    def finish(self, cls: type[Result] = ReplayResult, params: dict | None = None, bad_records: int = 0,
               volumes: Iterable[str] | None = None) -> Result:
        """Commit, take the last sample and build the result (per-volume usage of ``volumes``, default
        the replayed volumes and their snapshots)."""
        self.close()
        self.pool.commit()
        self._retry(self.last_time)
        # writes still queued when the trace ends fail: nothing in the trace frees space for them any more
        self.c["enospc_events"] += sum(len(q[0]) for q in self.queue)
        self.failed_bytes += self.pending_bytes
        self.queue, self.pending_bytes = [], 0
        self._check_mode()
        if not self.series["io"] or self.series["io"][-1] != self.c["ios"]:
            self._sample()
        c = self._derived()
        c["bad_records"] = bad_records
        if volumes is None:
            volumes = [t.thin.name for t in self.targets] + [n for t in self.targets for n in t.taken]
        volumes = list(volumes)
        # several volumes: one pass over the pool's trees for all of them (each pool.usage(name) walks
        # every tree to tell exclusive from shared blocks; a replay keeping 4 snapshots asked 5 times)
        every = {u.name: u for u in self.pool.usage()} if len(volumes) > 1 else {}
        usage = {}
        for name in volumes:
            u = every.get(name) or self.pool.usage(name)
            usage[name] = {"mapped_blocks": u.mapped_blocks, "exclusive_blocks": u.exclusive_blocks,
                           "shared_blocks": u.shared_blocks}
        return cls(c, self.series, usage, dict(params or {}))


class _Cumulative:
    """Record counts (reads, writes, discards, flushes, bytes read, bytes written) before each position:
    the positions of each op and the running byte sums of reads and writes, computed once per window."""

    def __init__(self, op: np.ndarray, length: np.ndarray) -> None:
        self.op, self.length = op, length
        self._idx: list[np.ndarray] | None = None

    def at(self, pos: int) -> tuple[int, ...]:
        op, ln = self.op, self.length
        if pos == len(op) and self._idx is None:  # the whole window: plain sums
            r, w = op == OP_READ, op == OP_WRITE
            return (int(np.count_nonzero(r)), int(np.count_nonzero(w)), int(np.count_nonzero(op == OP_DISCARD)),
                    int(np.count_nonzero(op == OP_FLUSH)), int(ln[r].sum()), int(ln[w].sum()))
        if self._idx is None:
            self._idx = [np.flatnonzero(op == code) for code in (OP_READ, OP_WRITE, OP_DISCARD, OP_FLUSH)]
            self._bytes = [np.cumsum(ln[self._idx[0]]), np.cumsum(ln[self._idx[1]])]
        k = [int(np.searchsorted(idx, pos)) for idx in self._idx]
        br = int(self._bytes[0][k[0] - 1]) if k[0] else 0
        bw = int(self._bytes[1][k[1] - 1]) if k[1] else 0
        return k[0], k[1], k[2], k[3], br, bw


class _Progress:
    """A rich progress bar with records/s on stderr, only on a terminal (and only when asked)."""

    def __init__(self, enabled: bool | None) -> None:
        self.p = None
        if enabled is None:
            enabled = False
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                              TextColumn("{task.completed:,} records"), TextColumn("{task.fields[rate]}"),
                              TextColumn("trace {task.fields[t]}"), TimeElapsedColumn(),
                              console=Console(stderr=True), transient=True)
            self.task = self.p.add_task("replaying", total=None, rate="", t="")
            self.p.start()
            self.t0 = _time.perf_counter()
            self.n = 0

    def advance(self, n: int, trace_time: float) -> None:
        if self.p is not None:
            self.n += n
            rate = self.n / max(_time.perf_counter() - self.t0, 1e-9)
            self.p.update(self.task, advance=n, rate=f"{rate:,.0f} records/s", t=f"{trace_time:,.1f} s")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None
