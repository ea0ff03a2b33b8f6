"""Scenarios (TOML) and sweeps: schema errors with key and line, several volumes driven by traces
merged by time, sweeps giving identical results on one process, a process pool and a Dask cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from thinpool.errors import InvalidArgument
from thinpool.simulate import ArrayTrace, parse_scenario, run, sweep
from thinpool.simulate.sweeps import cost_order, parse_sweep, points
from tests.support import require_module, require_tool

BS = 64 << 10
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCENARIO = """\
# a pool and one volume driven by a fio iolog
[pool]
data_size = "256MiB"
block_size = "64KiB"
metadata_only = true

[simulation]
sample_every = 500

[[volume]]
name = "db"
size = "32MiB"
trace = "w.iolog"
snapshot_every = 400
keep = 2
"""


def fio_iolog(path, name: str = "w") -> str:
    require_tool("fio")
    log = str(path / f"{name}.iolog")
    subprocess.run(["fio", f"--name={name}", f"--filename={path / (name + '.img')}", "--size=32M", "--bs=4k",
                    "--rw=randwrite", "--ioengine=psync", "--io_size=4M", "--randseed=3", f"--write_iolog={log}"],
                   check=True, capture_output=True, timeout=120)
    return log


@pytest.mark.parametrize("text, where, what", [
    (SCENARIO.replace("block_size = \"64KiB\"", "block_size = \"64KiB\"\nblok_size = 1"), ":5: [pool] blok_size",
     "unknown key"),
    (SCENARIO.replace("keep = 2", "keep = -2"), ":15: [[volume]] #1 keep", "non-negative"),
    (SCENARIO.replace("snapshot_every = 400", "snapshot_every = \"soon\""), ":14: [[volume]] #1 snapshot_every",
     "seconds"),
    (SCENARIO.replace("sample_every = 500", "sample_every = 500\nseed = 4"), ":9: [simulation] seed", "unknown"),
    (SCENARIO.replace("size = \"32MiB\"\n", ""), ":10: [[volume]] #1", "size is required"),
    (SCENARIO.replace("[[volume]]", "[[volume]]]"), "not valid TOML", "line 10"),
    (SCENARIO + "\n[[volume]]\nname = \"db\"\nsize = 1\ntrace = \"x\"\n", ":18: [[volume]] #2 name", "duplicate"),
])
def test_scenario_errors_name_key_and_line(text, where, what):
    with pytest.raises(InvalidArgument) as e:
        parse_scenario(text, "s.toml")
    assert where in str(e.value) and what in str(e.value)


def test_scenario_run_replays_each_volume_from_its_trace_merged_by_time(tmp_path):
    n = 400
    t = np.linspace(0, 40, n)
    blocks = np.arange(n) % 100
    both = ArrayTrace(np.ones(2 * n, np.uint8), np.concatenate([blocks, blocks]) * BS, np.full(2 * n, 4096),
                      np.concatenate([t, t]), np.concatenate([np.zeros(n), np.ones(n)]).astype(np.int32),
                      volumes=["a", "b"], path="both")
    order = np.argsort(both.time, kind="stable")
    both = ArrayTrace(both.op[order], both.offset[order], both.length[order], both.time[order],
                      both.volume[order], volumes=["a", "b"], path="both")
    s = parse_scenario(f"""
[pool]
data_size = "64MiB"
[[volume]]
name = "x"
size = "8MiB"
trace = "both"
trace_volume = "a"
snapshot_every = "10s"
keep = 1
[[volume]]
name = "y"
size = "8MiB"
trace = "both"
trace_volume = "b"
""")
    r = run(s, trace_opener=lambda v: both)
    c = r.counters
    assert c["ios"] == 2 * n and c["snapshots_taken"] == 4 and c["snapshots_deleted"] == 3
    assert r.volumes["x"]["mapped_blocks"] == r.volumes["y"]["mapped_blocks"] == 100
    # y is never snapshotted: no breaks there; x writes its 100 blocks once per 10 s, so after the snapshots
    # at 10, 20 and 30 s every block breaks sharing once (the one at 40 s precedes a block already broken)
    assert c["provisioned_blocks"] == 200 and c["cow_breaks"] == 3 * 100


def test_sweep_points_and_keys(tmp_path):
    s = parse_scenario(SCENARIO, str(tmp_path / "s.toml"))
    sw = parse_sweep(["block_size=64K,128K", "keep=1,3"])
    pts = points(s, sw)
    assert pts == [{"block_size": "64K", "keep": "1"}, {"block_size": "64K", "keep": "3"},
                   {"block_size": "128K", "keep": "1"}, {"block_size": "128K", "keep": "3"}]
    assert s.with_values(pts[3]).pool["block_size"] == 128 << 10 and s.with_values(pts[3]).volumes[0]["keep"] == 3
    for bad, msg in ((["keep"], "KEY=VALUE"), (["nope=1"], "not a scenario setting"),
                     (["block_size=12K"], "block_size"), (["volumes.zz.keep=1"], "no volume named")):
        with pytest.raises(InvalidArgument, match=msg):
            points(s, parse_sweep(bad))


def test_sweep_hands_out_the_likely_longest_runs_first(tmp_path):
    """Workers get the points with more blocks to span, then more frequent snapshots, then more kept
    first; points the estimate cannot tell apart keep the product's order."""
    s = parse_scenario(SCENARIO, str(tmp_path / "s.toml"))
    pts = points(s, parse_sweep(["keep=1,3", "block_size=256K,64K"]))
    assert [pts[i] for i in cost_order(s, pts)] == [
        {"keep": "3", "block_size": "64K"}, {"keep": "1", "block_size": "64K"},
        {"keep": "3", "block_size": "256K"}, {"keep": "1", "block_size": "256K"}]
    pts = points(s, parse_sweep(["snapshot_every=400,100", "sample_every=10,20"]))
    assert [pts[i] for i in cost_order(s, pts)] == [pts[2], pts[3], pts[0], pts[1]]


def test_rule_missing_optional_dependency_is_a_clear_error_sweep_to_pandas(monkeypatch):
    """Without pandas (an optional extra), SweepResult.to_pandas raises InvalidArgument naming the
    extra, as Result.to_pandas does -- not a bare ModuleNotFoundError from inside the library."""
    from thinpool.simulate import Result
    from thinpool.simulate.sweeps import SweepResult
    sr = SweepResult([({"keep": "1"}, Result({"cow_bytes_copied": 0}))])
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    for obj in (sr, sr.runs[0][1]):
        with pytest.raises(InvalidArgument, match=r"to_pandas needs pandas .*thinpool\[simulate\]"):
            obj.to_pandas()


def test_sweep_results_identical_in_process_on_workers_and_on_dask(tmp_path):
    fio_iolog(tmp_path)
    (tmp_path / "s.toml").write_text(SCENARIO)
    sw = {"block_size": ["64KiB", "256KiB"], "keep": [1, 3]}
    one = sweep(str(tmp_path / "s.toml"), sw).to_dict()
    two = sweep(str(tmp_path / "s.toml"), sw, workers=2).to_dict()
    distributed = require_module("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        dask = sweep(str(tmp_path / "s.toml"), sw, dask=client).to_dict()
    assert one == two == dask
    runs = one["runs"]
    assert [r["params"] for r in runs] == [{"block_size": b, "keep": k} for b in sw["block_size"] for k in sw["keep"]]
    # bigger blocks: fewer blocks, more bytes copied per break; keep changes what the snapshots hold only
    assert runs[0]["result"]["data_blocks_used"] != runs[1]["result"]["data_blocks_used"]
    assert runs[2]["result"]["cow_bytes_copied"] > runs[0]["result"]["cow_bytes_copied"]


def test_simulate_cli_sweep_json_and_html(tmp_path):
    require_module("matplotlib")
    fio_iolog(tmp_path)
    (tmp_path / "s.toml").write_text(SCENARIO)
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "thinpool", "simulate", str(tmp_path / "s.toml"), "--sweep",
                        "keep=1,2", "--json", str(tmp_path / "o.json"), "--html", str(tmp_path / "o.html")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads((tmp_path / "o.json").read_text())
    assert [r["params"] for r in d["runs"]] == [{"keep": "1"}, {"keep": "2"}]
    assert "keep=1" in p.stdout and (tmp_path / "o.html").read_text().count("data:image/png;base64,") == 3
    p = subprocess.run([sys.executable, "-m", "thinpool", "simulate", str(tmp_path / "s.toml"), "--sweep", "kep=1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "kep" in p.stderr


@pytest.mark.parametrize("mode, used", [("passdown", 0), ("nopassdown", 0), ("ignore", 2)])
def test_kernel_rule_ignore_discard_drops_discards_of_a_scenario(mode, used):
    """dm-thin's ignore_discard: the thin devices support no discards, so the trace's discards never
    unmap anything; with passdown or nopassdown they unmap whole blocks."""
    tr = ArrayTrace(np.array([1, 1, 2, 2], np.uint8), np.array([0, BS, 0, BS]), np.full(4, BS))
    s = parse_scenario(f'[pool]\ndata_size = "16MiB"\ndiscards = "{mode}"\nerror_if_no_space = false\n'
                       '[[volume]]\nname = "v"\nsize = "1MiB"\ntrace = "x"\n')
    r = run(s, trace_opener=lambda v: tr)
    assert r["discards"] == 2 and r["data_blocks_used"] == used and r.volumes["v"]["mapped_blocks"] == used
