"""I7: fio over NBD -- `thinpool serve` vs `qemu-nbd` + qcow2 (64 KiB clusters) vs `nbdkit file`.

    python -m perf.nbd [--full] [--docs]     (also run by `python -m perf --only I7`)

fio's nbd engine (libnbd) drives 4 KiB random reads and random writes at iodepth 1 and 16 against
servers listening on unix sockets in the same scratch directory, all started once and measured in
interleaved, rotated repeats (medians):

* ``thinpool serve`` on a pool with 64 KiB blocks, one volume;
* ``qemu-nbd -f qcow2`` (cache=writeback, aio=threads: its defaults) on a qcow2 image with 64 KiB clusters;
* ``nbdkit file`` (C, the raw file, its default 16 worker threads: the C anchor);
* ``nbdkit --threads 2 file`` for the multi-conn rows only.

Each target is filled over the tested region first (sequential 1 MiB writes through its own server), so
reads return real data and writes are overwrites of provisioned blocks/clusters on every side; then
every side serves one short unmeasured run of each workload (JIT, page cache).  Rows I7a-d: thinpool /
qemu-nbd (target >= 1.0); rows I7e-h: thinpool / nbdkit file on the same four workloads (target >= 1.0);
rows I7i-j (multi-conn): two fio jobs, each on its own connection at iodepth 16, against thinpool and
against nbdkit with two worker threads (target >= 1.0).  Each side's server CPU time per I/O
(``/proc/PID/stat``) is recorded beside its IOPS, and the load average before and after the run.
``--docs`` rewrites the NBD section of docs/performance.md (between its markers), nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from .common import (MiB, PERFORMANCE_MD, Row, Scratch, find_tool, interleave, log, machine, med, missing_msg,
                     perf_parser, status_cell, tool_version, write_section)

TITLE = "fio over NBD: thinpool serve vs qemu-nbd+qcow2 vs nbdkit file"
SECTION_BEGIN = "<!-- nbd: begin (written by `python -m perf.nbd --docs`) -->"
SECTION_END = "<!-- nbd: end -->"
WORKLOADS = [("randread", 1), ("randread", 16), ("randwrite", 1), ("randwrite", 16)]
SIDES = ("thinpool", "qemu-nbd", "nbdkit")
#: multi-conn rows: (rw, iodepth per job); two jobs, one connection each
MULTI = [("randread", 16), ("randwrite", 16)]
MULTI_JOBS = 2
MULTI_PEER = "nbdkit-t2"  # nbdkit --threads 2


# ----------------------------------------------------------------------------- servers
def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err[-500:]}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"server socket {path} did not come up in {timeout} s")


class Server:
    """A server subprocess listening on a unix socket, serving one export."""

    def __init__(self, name: str, cmd: list[str], sock: str, export: str) -> None:
        self.name = name
        self.sock = sock
        self.uri = f"nbd+unix:///{export}?socket={sock}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_socket(sock, self.proc)
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (``/proc/PID/stat``)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def fio(uri: str, rw: str, iodepth: int, size: int, runtime: float, *, bs: str = "4k",
        cwd: str | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """One fio run with the nbd engine; returns the job's JSON (raises on failure)."""
    cmd = [find_tool("fio") or "fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", f"--iodepth={iodepth}", "--output-format=json", "--randrepeat=0"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    cmd += extra or []
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=max(120, 10 * runtime))
    if r.returncode != 0:
        raise RuntimeError(f"fio {rw} qd{iodepth} on {uri} failed: {(r.stderr or r.stdout)[-500:]}")
    out = r.stdout
    (job,) = json.loads(out[out.index("{"):])["jobs"]
    if job.get("error"):
        raise RuntimeError(f"fio {rw} qd{iodepth} on {uri}: error {job['error']}")
    return job


def iops(job: dict[str, Any], rw: str) -> float:
    return float(job["read" if "read" in rw else "write"]["iops"])


def start_servers(sc: Scratch, size: int) -> dict[str, Server]:
    """Create the three targets of ``size`` bytes and start their servers (missing peers are skipped)."""
    from thinpool import Pool
    servers: dict[str, Server] = {}
    try:
        pool_dir = sc.path("nbd-pool")
        with Pool.create(pool_dir, data_size=size + 64 * MiB, block_size="64KiB") as p:
            p.create_thin("vol", size)
        tsock = os.path.join(sc.dir, "t.sock")
        servers["thinpool"] = Server("thinpool", [sys.executable, "-m", "thinpool", "serve", pool_dir,
                                                  "--socket", tsock], tsock, "vol")
        if find_tool("qemu-nbd") and find_tool("qemu-img"):
            img = sc.path("nbd.qcow2")
            subprocess.run([find_tool("qemu-img") or "qemu-img", "create", "-q", "-f", "qcow2",
                            "-o", "cluster_size=65536", img, str(size)], check=True)
            qsock = os.path.join(sc.dir, "q.sock")
            servers["qemu-nbd"] = Server("qemu-nbd", [find_tool("qemu-nbd") or "qemu-nbd", "-f", "qcow2", "-k", qsock,
                                                      "-x", "vol", "-t", "--cache=writeback", img], qsock, "vol")
        if find_tool("nbdkit"):
            raw = sc.path("nbd.raw")
            with open(raw, "wb") as f:
                f.truncate(size)
            ksock = os.path.join(sc.dir, "k.sock")
            servers["nbdkit"] = Server("nbdkit", [find_tool("nbdkit") or "nbdkit", "-f", "-U", ksock, "-e", "vol",
                                                  "file", raw], ksock, "vol")
            raw2 = sc.path("nbd2.raw")
            with open(raw2, "wb") as f:
                f.truncate(size)
            k2sock = os.path.join(sc.dir, "k2.sock")
            servers[MULTI_PEER] = Server(MULTI_PEER, [find_tool("nbdkit") or "nbdkit", "-f", "-U", k2sock, "-e", "vol",
                                                      "--threads", "2", "file", raw2], k2sock, "vol")
        for s in servers.values():  # provision the tested region on every side
            fio(s.uri, "write", 4, size, 0, bs="1M", cwd=sc.dir)
        for s in servers.values():  # warm up (the server's first 4 KiB requests may compile or fault in)
            for rw in ("randread", "randwrite"):
                fio(s.uri, rw, 16, size, 1, cwd=sc.dir)
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


# ----------------------------------------------------------------------------- the measurement
def _workload(sc: Scratch, servers: dict[str, Server], rw: str, qd: int, size: int, runtime: float, reps: int,
              jobs: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved repeats of one fio workload on ``servers``: (IOPS, mean completion latency in us,
    server CPU microseconds per I/O), each a list per side."""
    lat: dict[str, list[float]] = {n: [] for n in servers}
    cpu: dict[str, list[float]] = {n: [] for n in servers}
    extra = [f"--numjobs={jobs}", "--group_reporting"] if jobs > 1 else []

    def side(s: Server):
        def run(_r: int) -> float:
            c0 = s.cpu_seconds()
            job = fio(s.uri, rw, qd, size, runtime, cwd=sc.dir, extra=extra)
            c1 = s.cpu_seconds()
            part = job["read" if "read" in rw else "write"]
            lat[s.name].append(part["clat_ns"]["mean"] / 1000)
            n_io = float(part.get("total_ios") or 0) or iops(job, rw) * runtime
            cpu[s.name].append((c1 - c0) / max(n_io, 1.0) * 1e6)
            return iops(job, rw)
        return run
    res = interleave({n: side(s) for n, s in servers.items()}, reps)
    return res, lat, cpu


def measure(sc: Scratch, full: bool) -> dict[str, Any]:
    size = (512 if full else 256) * MiB
    runtime = 3 if full else 2
    reps = 7 if full else 5
    load_before = os.getloadavg()
    servers = start_servers(sc, size)
    single = {n: s for n, s in servers.items() if n != MULTI_PEER}
    multi = {n: s for n, s in servers.items() if n in ("thinpool", MULTI_PEER)}
    results: dict[str, dict[str, list[float]]] = {}
    lat: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    try:
        for rw, qd in WORKLOADS:
            key = f"{rw}-qd{qd}"
            log(f"perf.nbd: {key} ...")
            results[key], lat[key], cpu[key] = _workload(sc, single, rw, qd, size, runtime, reps)
        if len(multi) == 2:
            for rw, qd in MULTI:
                key = f"{rw}-qd{qd}-x{MULTI_JOBS}"
                log(f"perf.nbd: {key} (multi-conn) ...")
                results[key], lat[key], cpu[key] = _workload(sc, multi, rw, qd, size, runtime, reps, MULTI_JOBS)
    finally:
        for s in servers.values():
            s.stop()
    return {"size": size, "runtime_s": runtime, "repeats": reps, "sides": list(servers), "iops": results,
            "clat_us": lat, "cpu_us_per_io": cpu, "load_before": list(load_before),
            "load_after": list(os.getloadavg())}


def _side_values(d: dict[str, Any], key: str, sides: tuple[str, ...]) -> dict[str, float]:
    values: dict[str, float] = {}
    for what, field in (("iops", "iops"), ("clat_us", "clat_us"), ("cpu_us_per_io", "cpu_us")):
        per = d.get(what, {}).get(key, {})
        values.update({f"{n}_{field}": med(per[n]) for n in sides if per.get(n)})
    return values


def rows_from(d: dict[str, Any]) -> list[Row]:
    """I7a-d (vs qemu-nbd), I7e-h (vs nbdkit file), I7i-j (multi-conn vs nbdkit --threads 2)."""
    rows, vs_nbdkit = [], []
    for i, (rw, qd) in enumerate(WORKLOADS):
        key = f"{rw}-qd{qd}"
        values = _side_values(d, key, SIDES)
        title = f"fio nbd 4 KiB {rw} iodepth {qd}: thinpool serve / qemu-nbd+qcow2"
        if "qemu-nbd_iops" not in values:
            rows.append(Row(f"I7{'abcd'[i]}", title, values, None, ">= 1.0", "missing", note=missing_msg("qemu-nbd")))
        else:
            rows.append(Row(f"I7{'abcd'[i]}", title, values, values["thinpool_iops"] / values["qemu-nbd_iops"],
                            ">= 1.0").judge())
        ktitle = f"fio nbd 4 KiB {rw} iodepth {qd}: thinpool serve / nbdkit file"
        kvalues = {k: v for k, v in values.items() if not k.startswith("qemu")}
        if "nbdkit_iops" not in values:
            vs_nbdkit.append(Row(f"I7{'efgh'[i]}", ktitle, kvalues, None, ">= 1.0", "missing",
                                 note=missing_msg("nbdkit")))
        else:
            vs_nbdkit.append(Row(f"I7{'efgh'[i]}", ktitle, kvalues, values["thinpool_iops"] / values["nbdkit_iops"],
                                 ">= 1.0").judge())
    rows += vs_nbdkit
    for i, (rw, qd) in enumerate(MULTI):
        key = f"{rw}-qd{qd}-x{MULTI_JOBS}"
        title = (f"fio nbd multi-conn: {MULTI_JOBS} jobs x 4 KiB {rw} iodepth {qd}, one connection each: "
                 f"thinpool serve / nbdkit --threads 2 file")
        values = _side_values(d, key, ("thinpool", MULTI_PEER))
        if f"{MULTI_PEER}_iops" not in values:
            rows.append(Row(f"I7{'ij'[i]}", title, values, None, ">= 1.0", "missing", note=missing_msg("nbdkit")))
        else:
            rows.append(Row(f"I7{'ij'[i]}", title, values, values["thinpool_iops"] / values[f"{MULTI_PEER}_iops"],
                            ">= 1.0").judge())
    return rows


def run(sc: Scratch, full: bool) -> tuple[list[Row], dict[str, Any]]:
    """The perf suite's hook (perf/run.py step I7)."""
    if not find_tool("fio"):
        return [Row("I7", TITLE, {}, None, ">= 1.0", "missing", note=missing_msg("fio"))], {}
    d = measure(sc, full)
    return rows_from(d), d


# ----------------------------------------------------------------------------- docs section
ANALYSIS = """\
**Reading these numbers.**  This 2-core VM is shared with other jobs (the load average is stated above);
CFS shares the CPUs per runnable thread, so how a server's throughput holds up under load depends on
how many threads it has runnable, not only on what a request costs it.  Read the CPU time per I/O
beside the IOPS: it hardly moves with the load, the IOPS move by 2x and more -- between full runs of
the same build at load 1.3-9 a row's ratio moved by 3x (see "What limits" below).  Iodepth 1 is pure
latency (a round trip per request, 14-70 us in these runs): a wake-up from idle adds tens of
microseconds per message (busy-polling saves it while a CPU is free), and an unpinned run lands on the
client's CPU or the other one.

**Where the server's time goes.**  Plain READs and the WRITEs of these rows are served by a compiled
loop without the GIL and without the pool's lock (docs/design.md, "Compiled NBD reads"): header check,
map lookup, `pread` -- or, for a WRITE that overwrites a provisioned block the volume does not share
(every write here: the region is provisioned first), one `lseek` (the data file's size check) and one
`pwrite` in place -- replies, and the wait for the next request, in one numba `nogil` kernel calling
libc.  Reads take the read side of the pool lock's reader-writer lock, in-place writes its write side;
both check the lock's generation.  First writes, copy-on-write after a snapshot, FUA, FLUSH, TRIM and
every error reply stay on the Python path.  Server CPU per I/O (the full runs of 2026-12-06, load 1.3-9):
reads 5-6 us at iodepth 16 (nbdkit file 9-12.5), 8.6-24 us at iodepth 1 (the busy-poll's CPU counts there:
it polls longest on an idle machine; nbdkit 18-25.5); writes 5.7-8.7 us at iodepth 16 (15.5-16.5 through the Python
path; nbdkit 18-25), 10.8-27 us at iodepth 1 (31-34; nbdkit 30-36); two connections 2.9-4.5 us per read
and 5.9-8.4 us per write.  A/B in one run, interleaved (2 s runs,
medians of 5, load 6-8.5, IOPS): the build before in-place writes and the binding fix below / after /
nbdkit file / nbdkit --threads 2 -- reads at iodepth 1: 26,225 / 32,497 / 22,392 / 35,993; at iodepth
16: 43,350 / 50,267 / 44,162 / 34,536; writes at iodepth 1: 10,916 / 20,455 / 17,412 / 23,499; at
iodepth 16: 19,231 / 37,420 / 47,501 / 55,213; two connections at iodepth 16, reads: 34,545 / 71,494 /
63,743 / 97,729; writes: 19,825 / 42,090 / 46,962 / 44,121.

**Two connections rebound at every request (fixed).**  A connection binds its compiled loop under the
pool lock, and every outermost acquisition of that lock while another connection's loop was registered
moved the generation -- which invalidated that connection's binding; it rebound (taking the lock and
moving the generation again), so two connections invalidated each other in turn and each request of
each went through Python to bind again (tests/serve/test_nbd_batched.py: 40 bindings for 40 alternating
requests).  That was the higher CPU per read with two connections (9.1-9.6 us against ~5 with one)
noted here before.  Binding now holds the lock with `PoolLock.inspecting()`, which moves no generation
(binding changes nothing): one binding per connection, 3.4-4.5 us per read.

**Batching.**  A session already takes everything the socket holds in one `recv` and serves every
complete request in its buffer before it sends the replies in one `send` (`sendmsg` on the Python path)
and before it waits again -- in the compiled loop and on the Python path.  In-process counters (load
~6): two connections at iodepth 16, 8-9 reads and 12-15 writes per receive and per blocking `poll`; one
connection at iodepth 16, ~6.5 reads per receive; at iodepth 1 one request per receive (what is there).
A WRITE payload that arrives after its header (~9 % of writes at iodepth 1) gets one wait of at most
20 ms in the loop, then the Python path's receive under the message deadline.  Tried and not kept:
sending the replies every 4 or 8 requests instead of once per batch, so that fio refills its queue
while the rest is served (load ~7, medians of 7: one connection reads 36,131 / 32,956 against 34,615,
writes 34,005 / 30,753 against 28,347, two connections reads 67,616 / 92,748 against 75,158 -- within
this machine's noise; every reply at once was worse, 51,475 against 64,887); busy-polling in the
compiled loop with two connections (it holds no GIL): 96,460 against 117,878.

**What limits the rows that are short.**  Not the CPU time per request: ours is below nbdkit's on
every row in every run (about half at iodepth 16 and with two connections).  The full runs of this build on 2026-12-06 (load average before /
after: 5.0 / 8.4, 8.6 / 6.9, 6.9 / 4.2, 2.7 / 4.2, 1.3 / 3.6) gave vs nbdkit file: read QD1 1.20 / 0.72 / 2.45 / 1.96 / 1.16,
read QD16 0.94 / 1.01 / 1.20 / 1.70 / 1.60, write QD1 0.77 / 1.33 / 2.35 / 2.18 / 1.65, write QD16 0.80 / 1.71 /
2.71 / 2.18 / 2.71, multi-conn reads 0.91 / 0.63 / 1.16 / 1.76 / 2.77, writes 1.62 / 1.38 / 2.23 / 2.25 /
2.61.  The table
above is the last of these runs, at the lowest load (every row passes).  At load 7-9 a row passes in one run and not in the next with the same CPU per I/O:
under load the server and fio mostly *wait*.  Each connection runs in lock-step with its fio job (fio
sends its queue in a burst once it has the replies; serving a batch of ~16 takes ~60-100 us, the rest
of a cycle of 0.2-0.6 ms is the two wake-ups, ours and fio's, waiting for a CPU behind other jobs).
nbdkit serves a connection with several threads: replies leave as each finishes, fio refills
continuously, and nbdkit has runnable threads when CPUs free up -- it loses less to a busy machine,
most visibly on multi-conn reads (I7i: 0.63-0.91 at load 5-9, 1.16-2.77 at 1.3-7).  Holding I7i under load
needs more than one thread per connection in the compiled loop -- a leader/follower pair on the socket
(one receives while the other reads and replies), with the Python path parked while they run -- not
done.  Before this build, at load 0.5-4.6 (the run just before it, 2026-12-06): 0.67 / 1.22 / 0.73 /
1.52 and multi-conn 0.91 / 0.94.

**Busy-polling and load.**  A/B of the same build at load 9-11 (interleaved, medians of 5): polling on
/ off, 4,408 / 8,369 IOPS for reads at iodepth 1, 4,352 / 6,229 for writes; off was ahead at iodepth 16
too (+9 %, +11 %), and with two connections (reads QD16: +18 %, QD1: +79 %).  So a session now polls
only while it is the only connection in the transmission phase, and stops for 100 ms after a
`sched_yield` took over 30 us (it gave the CPU to another task or the GIL to another thread) without a
request arriving, or took longer than the whole 100 us window (until 2026-12-07 only the first
counted, and at iodepth 1 the request nearly always arrived while the other task ran its time slice:
a session sharing its CPU with a busy process kept polling, and those requests waited for that slice);
on an idle machine it polls as before.  Between requests the compiled loop waits in one blocking
`recv` (no `poll` before it): a READ at iodepth 1 costs the session a `recv`, a `pread` and a `send`.  Multi-conn is safe to advertise: every connection serves the one
pool under its lock (compiled reads under its reader-writer side's read side, in-place writes under
its write side: a read after a write's reply sees the write), and a FLUSH on any connection commits the
pool, so the spec's rule (a write whose reply arrived, then a flush on another connection: visible on a
third and durable) holds; tests/serve checks it across a SIGKILL.

**History.**  Before the session's batched socket I/O (7389b76) full runs gave 0.86 / 0.73 / 1.30 / 0.76
vs qemu-nbd (read QD1, read QD16, write QD1, write QD16); after it 1.53 / 1.10 / 1.07 / 1.27.  Session 2
of the NBD work: unsigned indices in the kernels' byte copies (2.7 us -> 0.3 us per 4 KiB copy),
`recv_into` one reusable buffer, one `unpack_from` per header, a fast path for plain in-range READ and
WRITE, queued replies in one `sendmsg` (header and data, no join copy), no extents query for reads of
at most one block, and busy-polling before blocking (up to 100 us, adaptive).  Then 2.96 / 2.81 / 1.58 /
1.92 vs qemu-nbd (quick) and, on 2026-11-28 (full, 5 x 5 s), 1.89 / 3.10 / 2.71 / 1.79 vs qemu-nbd and
1.10 / 0.89 / 1.29 / 1.47 vs nbdkit file.
Session 3 (anchoring on C peers): rows I7e-h against nbdkit file and I7i-j multi-conn, warm-up before measuring
(the first 4 KiB requests of a fresh server may compile: one such sample measured 0 IOPS), server CPU
per I/O and the load average recorded, the polling rule above, and one `poll` per request fewer: the
socket the busy-poll wait found readable was polled a second time (A/B at load 10: reads QD1 +27 %,
writes QD1 +11 %, reads QD16 +24 %; CPU per read at QD1 34 -> 26 us).  On the way: the busy-poll
wait ran for every empty buffer, also inside a message, where its wait has no limit -- a WRITE header
sent alone and then silence held the session past the message deadline; it now runs between requests
only (tests/serve checks the deadline).
Session 4 (2026-12-06, C-speed reads over several connections): the compiled read loop and the pool lock's reader-writer side above; reads
of several connections run in parallel (the Python path's two connections gave 1.0x one connection).
The full run before it (2026-12-06, load 4.7-5.4, every request through the Python path): vs nbdkit file
1.47 / 1.15 / 1.64 / 1.96 (read QD1, read QD16, write QD1, write QD16), multi-conn reads 0.65, writes
1.73 (79,944 against 123,743 and 49,368 against 28,472 IOPS).  A/B of the compiled read loop then (medians
of 3, load 9-10.7, IOPS), on / off / nbdkit file / nbdkit --threads 2: reads at iodepth 1 10,597 / 6,314 /
21,914 / 30,760; at iodepth 16 23,774 / 20,934 / 29,335 / 52,053; two connections 28,873 / 20,963 /
79,067 / 111,911.  Its full run (load ~9.5): 0.70 / 1.01 / 0.73 / 0.75, multi-conn 0.30 / 0.68.
Session 5 (2026-12-06, writes at C speed, multi-conn): in-place WRITEs in the compiled loop, one binding
per connection (both above), tests for pipelined, split and cut-off requests (tests/serve/test_nbd_batched.py).
"""

def _cell(v: dict[str, Any], side: str) -> str:
    if f"{side}_iops" not in v:
        return "-"
    return (f"{v[f'{side}_iops']:,.0f} ({v.get(f'{side}_clat_us', 0):.0f} us, "
            f"{v.get(f'{side}_cpu_us', float('nan')):.1f} us CPU)")


def table_md(rows: list[Row], d: dict[str, Any]) -> str:
    by_key = {r.key: r for r in rows}
    out = ["| workload | thinpool serve | qemu-nbd + qcow2 | nbdkit file | thinpool / qemu-nbd "
           "| thinpool / nbdkit | target | status (vs qemu-nbd, vs nbdkit) |", "|---|---|---|---|---|---|---|---|"]
    for i, (rw, qd) in enumerate(WORKLOADS):
        q, k = by_key[f"I7{'abcd'[i]}"], by_key[f"I7{'efgh'[i]}"]
        v = dict(q.values, **k.values)
        rq = f"{q.ratio:.2f}" if q.ratio is not None else "-"
        rk = f"{k.ratio:.2f}" if k.ratio is not None else "-"
        out.append(f"| I7{'abcd'[i]}/I7{'efgh'[i]}: 4 KiB {rw}, iodepth {qd} | {_cell(v, 'thinpool')} | "
                   f"{_cell(v, 'qemu-nbd')} | {_cell(v, 'nbdkit')} | {rq} | {rk} | >= 1.0 | "
                   f"{status_cell(q)}, {status_cell(k)} |")
    out += ["", f"| multi-conn ({MULTI_JOBS} fio jobs, one connection each) | thinpool serve | nbdkit --threads 2 file "
            f"| thinpool / nbdkit | target | status |", "|---|---|---|---|---|---|"]
    for i, (rw, qd) in enumerate(MULTI):
        r = by_key.get(f"I7{'ij'[i]}")
        if r is None:
            continue
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        out.append(f"| I7{'ij'[i]}: 4 KiB {rw}, iodepth {qd} per job | {_cell(r.values, 'thinpool')} | "
                   f"{_cell(r.values, MULTI_PEER)} | {ratio} | {r.target} | {status_cell(r)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("nbd", __doc__, "512 MiB region, 3 s runs, 7 repeats (quick: 256 MiB, 2 s, 5)", "NBD",
                     json_help="also write the raw figures to this file")
    ap.add_argument("--from-json", help="do not measure: report the figures a previous --json run saved")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        m, d = saved["machine"], saved["detail"]
        rows = rows_from(d)
        a.full = d["runtime_s"] >= 3
    else:
        m = machine()
        with Scratch() as sc:
            rows, d = run(sc, a.full)
    for r in rows:
        print(r.line(), flush=True)
    if d:
        print()
        print(table_md(rows, d))
    if a.json:
        d["date"] = time.strftime("%Y-%m-%d")
        d["versions"] = {t: tool_version(t) for t in ("fio", "qemu-nbd", "nbdkit")}
        with open(a.json, "w") as f:
            json.dump({"machine": m, "rows": [r.as_dict() for r in rows], "detail": d}, f, indent=1)
    if a.docs and d:
        vers = d.get("versions") or {t: tool_version(t) for t in ("fio", "qemu-nbd", "nbdkit")}
        versions = "; ".join(f"{t}: {v}" for t, v in vers.items())
        lb, la = d.get("load_before"), d.get("load_after")
        load = (f"  Load average (1, 5, 15 min) {lb[0]:.1f} / {lb[1]:.1f} / {lb[2]:.1f} before the run and "
                f"{la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} after it (2 cores).") if lb and la else ""
        body = (f"## fio over NBD (`python -m perf.nbd{' --full' if a.full else ''}`)\n\n"
                f"Measured {d.get('date') or time.strftime('%Y-%m-%d')} on {m['cpu']} ({m['cores']} cores), "
                f"kernel {m['kernel']}, Python {m['python']}; {versions}.  fio's nbd engine (libnbd) over unix "
                f"sockets, {d['size'] // MiB} MiB region provisioned first on every side, {d['runtime_s']} s per "
                f"run, {d['repeats']} interleaved repeats (medians; in brackets the mean completion latency and "
                f"the server's CPU time per I/O).{load}  Targets: thinpool >= 1.0x qemu-nbd and >= 1.0x nbdkit "
                f"file.\n\n" + table_md(rows, d) + "\n\n" + ANALYSIS)
        write_section(PERFORMANCE_MD, SECTION_BEGIN, SECTION_END, body)
        print("docs: docs/performance.md (NBD section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
