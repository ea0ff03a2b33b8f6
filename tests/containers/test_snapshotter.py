"""The containerd-style snapshotter: semantics, every error kind, exact block-level usage, and crash
atomicity of snapshot records versus thin devices."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ReadOnly
from thinpool.containers.snapshotter import Info, Snapshotter, owned_blocks, parse_filter

BS = 64 * 1024
BASE = 16 << 20


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", data_size="64MiB", block_size=BS)
    yield p
    p.close(commit=False)


@pytest.fixture
def snap(pool):
    return Snapshotter(pool, base_size=BASE)


def state(pool, ns="default"):
    """Everything the snapshotter persists: records and the snap/ volumes (name, read-only)."""
    return (json.dumps(pool.get_records("snapshots/" + ns), sort_keys=True),
            sorted((t.name, t.read_only) for t in pool.thins()))


def committed_chain(s, *, blocks=3):
    """base (committed, `blocks` blocks of 0x11) and an active child `c` of it."""
    m = s.prepare("base-extract")
    m.thin.write(0, b"\x11" * (blocks * BS))
    s.commit("base", "base-extract")
    return s.prepare("c", "base")


# ------------------------------------------------------------------------------------------ semantics
def test_prepare_commit_view_lifecycle(pool, snap):
    m = snap.prepare("k1", labels={"a": "1"})
    assert (m.type, m.source, m.options, m.read_only) == ("thin", "snap/default/1", ("rw",), False)
    assert m.thin.size == BASE and m.thin.mapped_blocks == 0 and not m.thin.read_only
    info = snap.stat("k1")
    assert (info.kind, info.name, info.parent, info.labels) == ("active", "k1", "", {"a": "1"})
    assert info.created == info.updated and info.created.tzinfo is not None
    m.thin.write(BS, b"layer-one")

    c = snap.commit("l1", "k1", labels={"b": "2"})
    assert (c.kind, c.name, c.parent, c.labels) == ("committed", "l1", "", {"b": "2"})  # labels replaced
    with pytest.raises(NotFound, match="'k1'"):
        snap.stat("k1")
    vol = snap.volume("l1")
    assert vol.name == "snap/default/1" and vol.read_only  # same volume name, now read-only
    with pytest.raises(ReadOnly):
        vol.write(0, b"x")
    assert vol.read(BS, 9) == b"layer-one"

    child = snap.prepare("k2", "l1")
    assert child.source == "snap/default/2" and child.thin.read(BS, 9) == b"layer-one"
    child.thin.write(BS, b"LAYER")
    assert vol.read(BS, 9) == b"layer-one" and child.thin.read(BS, 9) == b"LAYER-one"
    assert snap.stat("k2").parent == "l1"

    v = snap.view("v1", "l1")
    assert v.options == ("ro",) and v.thin.read_only and v.thin.read(BS, 9) == b"layer-one"
    with pytest.raises(ReadOnly):
        v.thin.write(0, b"x")
    assert snap.stat("v1").kind == "view" and snap.mounts("v1").source == v.source
    assert snap.mounts("k2").options == ("rw",)

    empty_view = snap.view("v0")  # a view without parent: an empty read-only volume
    assert empty_view.thin.read_only and empty_view.thin.size == BASE

    snap.remove("v1")
    snap.remove("k2")
    snap.remove("v0")
    snap.remove("l1")
    assert snap.walk() == [] and [t.name for t in pool.thins()] == []
    assert snap.check() == []


def test_children_inherit_parent_size_and_base_size_configurable(pool):
    s = Snapshotter(pool, base_size="4MiB")
    s.prepare("a")
    s.commit("A", "a")
    assert s.prepare("b", "A").thin.size == 4 << 20
    with pytest.raises(InvalidArgument):
        Snapshotter(pool, base_size="lots")


def test_records_live_in_pool_metadata_and_survive_reopen(tmp_path):
    p = Pool.create(tmp_path / "p", data_size="16MiB")
    s = Snapshotter(p, base_size=BASE)
    s.prepare("a", labels={"x": "y"})
    s.commit("A", "a")
    s.prepare("b", "A")
    p.close(commit=False)  # autocommit already committed each mutation
    p = Pool.open(tmp_path / "p")
    s = Snapshotter(p)
    assert [(i.name, i.kind, i.parent) for i in s.walk()] == [("A", "committed", ""), ("b", "active", "A")]
    assert set(p.get_records("snapshots/default")["snapshots"]) == {"A", "b"}
    assert s.check() == [] and p.check().ok
    p.close()


def test_volume_names_are_reversible_and_namespaces_separate(pool):
    a = Snapshotter(pool, "ns-a", base_size=BASE)
    b = Snapshotter(pool, "ns.b", base_size=BASE)
    assert a.prepare("same").source == "snap/ns-a/1"
    assert b.prepare("same").source == "snap/ns.b/1"  # same key, other namespace: no conflict
    a.commit("A", "same")
    assert Snapshotter.parse_volume_name("snap/ns-a/1") == ("ns-a", 1)
    assert Snapshotter.parse_volume_name("base") is None
    assert a.key_for_volume("snap/ns-a/1") == "A" and b.key_for_volume("snap/ns.b/1") == "same"
    assert a.volume_name("A") == "snap/ns-a/1"
    with pytest.raises(NotFound):
        a.key_for_volume("snap/ns.b/1")
    with pytest.raises(NotFound):
        a.key_for_volume("snap/ns-a/99")
    assert [i.name for i in b.walk()] == ["same"] and [i.name for i in a.walk()] == ["A"]
    for bad in ("", "a/b", "-x", "x" * 77, 3):
        with pytest.raises(InvalidArgument):
            Snapshotter(pool, bad)


def test_stray_volume_in_our_namespace_is_skipped_and_reported(pool, snap):
    pool.create_thin("snap/default/1", "1MiB")  # not created by the snapshotter
    assert snap.prepare("k").source == "snap/default/2"
    problems = snap.check()
    assert len(problems) == 1 and "'snap/default/1'" in problems[0] and "no snapshot record" in problems[0]


def test_update_labels_only(snap):
    snap.prepare("k", labels={"a": "1", "b": "2"})
    before = snap.stat("k")
    time.sleep(0.002)
    upd = snap.update(Info(kind="active", name="k", labels={"a": "9", "c": "3"}), ["labels.a"])
    assert upd.labels == {"a": "9", "b": "2"} and upd.updated > before.updated and upd.created == before.created
    assert snap.update(Info("active", "k", labels={}), ["labels.b"]).labels == {"a": "9"}  # absent -> deleted
    assert snap.update(Info("active", "k", labels={"z": "0"}), ["labels"]).labels == {"z": "0"}
    assert snap.update(Info("active", "k", labels={"y": "1"})).labels == {"y": "1"}  # no paths: replace all
    assert snap.stat("k").labels == {"y": "1"}
    for path in ("kind", "parent", "name", "created", "labels."):
        with pytest.raises(InvalidArgument, match="'k'"):
            snap.update(Info("active", "k", labels={}), [path])
    assert snap.stat("k").labels == {"y": "1"}  # failed updates change nothing
    with pytest.raises(NotFound, match="'nope'"):
        snap.update(Info("active", "nope", labels={}), ["labels"])


# ------------------------------------------------------------------------------------------ errors
def test_every_error_kind_names_the_key_and_changes_nothing(pool, snap):
    snap.prepare("base-a")
    snap.commit("base", "base-a")
    snap.prepare("act", "base")
    snap.view("vw", "base")
    before = state(pool)

    cases = [
        (AlreadyExists, "'act'", lambda: snap.prepare("act", "base")),
        (AlreadyExists, "'base'", lambda: snap.prepare("base")),  # keys and names share one key space
        (AlreadyExists, "'vw'", lambda: snap.view("vw", "base")),  # View twice with one key fails
        (AlreadyExists, "'base'", lambda: snap.commit("base", "act")),
        (AlreadyExists, "'vw'", lambda: snap.commit("vw", "act")),
        (NotFound, "'missing'", lambda: snap.prepare("new", "missing")),
        (NotFound, "'missing'", lambda: snap.view("new", "missing")),
        (NotFound, "'missing'", lambda: snap.commit("new", "missing")),
        (NotFound, "'missing'", lambda: snap.remove("missing")),
        (NotFound, "'missing'", lambda: snap.stat("missing")),
        (NotFound, "'missing'", lambda: snap.usage("missing")),
        (NotFound, "'missing'", lambda: snap.mounts("missing")),
        (NotFound, "'missing'", lambda: snap.volume("missing")),
        (InvalidArgument, "'act'", lambda: snap.prepare("new", "act")),  # parent not committed
        (InvalidArgument, "'vw'", lambda: snap.view("new", "vw")),
        (InvalidArgument, "key", lambda: snap.prepare("")),
        (InvalidArgument, "key", lambda: snap.prepare(None)),
        (InvalidArgument, "control", lambda: snap.prepare("a\nb")),
        (InvalidArgument, "'new'", lambda: snap.prepare("new", labels={"k": 1})),
        (InvalidArgument, "'new'", lambda: snap.prepare("new", labels=["k"])),
        (InvalidArgument, "'new'", lambda: snap.prepare("new", labels={"k": "v" * 5000})),
        (InvalidArgument, "name", lambda: snap.commit("", "act")),
        (FailedPrecondition, "'vw'", lambda: snap.commit("new", "vw")),  # a view cannot be committed
        (FailedPrecondition, "'base'", lambda: snap.commit("new", "base")),  # committed is not active
        (FailedPrecondition, "'base'", lambda: snap.remove("base")),  # has children
        (FailedPrecondition, "'base'", lambda: snap.mounts("base")),  # committed: no mounts
        (InvalidArgument, "unknown field", lambda: snap.walk("size==3")),
    ]
    for exc, needle, fn in cases:
        with pytest.raises(exc) as info:
            fn()
        assert needle in str(info.value), (exc, str(info.value))
        assert state(pool) == before, str(info.value)
    with pytest.raises(FailedPrecondition, match="with child"):
        snap.remove("base")


def test_commit_with_uncommitted_parent_is_failed_precondition(pool, snap):
    snap.prepare("p")
    snap.commit("P", "p")
    snap.prepare("c", "P")
    recs = pool.get_records("snapshots/default")
    recs["snapshots"]["P"]["kind"] = "active"  # a damaged record set: the parent is no longer committed
    pool.put_records("snapshots/default", recs)
    with pytest.raises(FailedPrecondition, match="parent 'P' is not committed"):
        snap.commit("C", "c")
    assert snap.stat("c").kind == "active"


def test_failed_record_write_rolls_back_the_device(pool, snap, monkeypatch):
    snap.prepare("base-a")
    snap.commit("base", "base-a")
    before = state(pool)

    def boom(*a, **k):
        raise OSError("simulated failure writing records")
    monkeypatch.setattr(pool, "put_records", boom)
    with pytest.raises(OSError):
        snap.prepare("x", "base")
    monkeypatch.undo()
    assert state(pool) == before and snap.check() == []


def test_remove_after_children_removed_frees_blocks(pool, snap):
    c = committed_chain(snap)
    c.thin.write(10 * BS, b"z")
    assert pool.status().used_data_blocks == 4
    snap.remove("c")
    snap.remove("base")
    pool.commit()
    assert pool.status().used_data_blocks == 0 and pool.thins() == []


# ------------------------------------------------------------------------------------------ walk
def test_walk_filters(snap):
    snap.prepare("b1", labels={"containerd.io/gc.root": "x", "app": "web"})
    snap.commit("L1", "b1", labels={"containerd.io/gc.root": "x", "tier": "base"})
    snap.prepare("act-web", "L1", labels={"app": "web"})
    snap.prepare("act-db", "L1", labels={"app": "db", "tier": ""})
    snap.view("view-1", "L1")
    names = lambda *f: [i.name for i in snap.walk(list(f))]  # noqa: E731

    assert names() == ["L1", "act-db", "act-web", "view-1"]
    assert names("") == names()
    assert names("kind==committed") == ["L1"]
    assert names("kind==view") == ["view-1"]
    assert names("name==act-web") == ["act-web"]
    assert names('name=="act-web"') == ["act-web"]
    assert names("parent==L1") == ["act-db", "act-web", "view-1"]
    assert names("parent==L1,kind==active") == ["act-db", "act-web"]  # comma: AND
    assert names("kind==committed", "kind==view") == ["L1", "view-1"]  # several filters: OR
    assert names('labels."containerd.io/gc.root"==x') == ["L1"]
    assert names("labels.app==web") == ["act-web"]
    assert names("labels.app!=web") == ["L1", "act-db", "view-1"]
    assert names("labels.app") == ["act-db", "act-web"]  # bare field: label present
    assert names("labels.tier") == ["L1", "act-db"]  # present even with an empty value
    assert names("parent") == ["act-db", "act-web", "view-1"]  # non-empty parent
    assert names("name~=^act-") == ["act-db", "act-web"]
    assert names('name~="w[e]b$"') == ["act-web"]
    assert names("kind==active,labels.app==db,parent==L1") == ["act-db"]
    assert names("kind==active,labels.app==nope") == []
    assert parse_filter("labels.k==a=b c")[0].value == "a=b c"  # a bare value runs to the next comma
    seen = []
    snap.walk("kind==active", fn=seen.append)
    assert [i.name for i in seen] == ["act-db", "act-web"]
    for bad in ("kind==bogus", "labels==x", "name.x==y", "==x", "name==", 'name=="x',
                "name~=[", "name==x,,", "size"):
        with pytest.raises(InvalidArgument):
            parse_filter(bad)


# ------------------------------------------------------------------------------------------ usage
def test_usage_counts_overwrites_of_inherited_blocks(pool, snap):
    c = committed_chain(snap, blocks=3)
    base = snap.usage("base")
    assert (base.owned_blocks, base.mapped_blocks, base.size_bytes, base.mapped_growth_blocks) == (3, 3, 3 * BS, 3)
    u = snap.usage("c")
    assert (u.owned_blocks, u.mapped_blocks, u.shared_blocks, u.exclusive_blocks, u.size_bytes) == (0, 3, 3, 0, 0)
    assert u.inodes == -1 and u.block_size == BS

    used = pool.status().used_data_blocks
    c.thin.write(BS + 100, b"overwrite")  # a partial overwrite of an inherited block: CoW of 1 block
    u = snap.usage("c")
    assert u.owned_blocks == 1 and u.size_bytes == BS
    assert u.mapped_blocks == 3  # the mapped count does not grow ...
    assert u.mapped_growth_blocks == 0  # ... so containerd's devmapper "mapped growth" misses the overwrite
    assert (u.exclusive_blocks, u.shared_blocks) == (1, 2)
    assert pool.status().used_data_blocks == used + 1
    assert snap.usage("base").owned_blocks == 3  # the parent is untouched

    c.thin.write(BS + 200, b"again")  # the same block again: already owned
    assert snap.usage("c").owned_blocks == 1
    c.thin.write(7 * BS, b"new")  # a new block
    u = snap.usage("c")
    assert (u.owned_blocks, u.mapped_blocks, u.mapped_growth_blocks) == (2, 4, 1)
    c.thin.discard(0, BS)  # unmapping an inherited block: not owned, mapped shrinks
    u = snap.usage("c")
    assert (u.owned_blocks, u.mapped_blocks, u.mapped_growth_blocks) == (2, 3, 0)
    assert pool.status().used_data_blocks == used + 2


def test_usage_of_grandchild_is_relative_to_its_parent(snap):
    c = committed_chain(snap, blocks=2)
    c.thin.write(0, b"c" * 10)
    c.thin.write(5 * BS, b"c")
    snap.commit("C", "c")
    g = snap.prepare("g", "C")
    assert snap.usage("C").owned_blocks == 2 and snap.usage("g").owned_blocks == 0
    g.thin.write(BS, b"g")  # inherited from base through C
    g.thin.write(5 * BS, b"g")  # C's own block
    assert snap.usage("g").owned_blocks == 2 and snap.usage("g").mapped_blocks == 3
    v = snap.view("v", "C")
    assert snap.usage("v").owned_blocks == 0 and snap.usage("v").mapped_blocks == 3


def test_owned_matches_a_set_based_reference_on_random_writes(pool, snap):
    rng = random.Random(7)
    m = snap.prepare("p")
    for _ in range(60):
        m.thin.write(rng.randrange(200) * BS + rng.randrange(BS - 8), b"parent!!")
    snap.commit("P", "p")
    c = snap.prepare("c", "P")
    for _ in range(80):
        vb = rng.randrange(250)
        c.thin.write(vb * BS + rng.randrange(BS - 8), b"child!!!")
        if rng.random() < 0.1:
            c.thin.discard(rng.randrange(250) * BS, BS)
    pvb, pdb, _ = snap.volume("P").mappings()
    cvb, cdb, _ = snap.volume("c").mappings()
    parent = set(zip(pvb.tolist(), pdb.tolist()))
    expected = sum(1 for pair in zip(cvb.tolist(), cdb.tolist()) if pair not in parent)
    assert 0 < expected < len(cvb)
    assert snap.usage("c").owned_blocks == expected


def test_owned_blocks_function_edges():
    a = np.array([1, 5, 9], np.int64)
    d = np.array([10, 50, 90], np.int64)
    assert owned_blocks(a, d, None, None) == 3
    assert owned_blocks(a, d, np.zeros(0, np.int64), np.zeros(0, np.int64)) == 3
    assert owned_blocks(np.zeros(0, np.int64), np.zeros(0, np.int64), a, d) == 0
    assert owned_blocks(a, d, a, d) == 0
    assert owned_blocks(np.array([1, 5, 9, 20]), np.array([10, 51, 90, 7]), a, d) == 2  # remapped 5, new 20
    assert owned_blocks(np.array([0]), np.array([10]), a, d) == 1  # before the parent's first block


# ------------------------------------------------------------------------------------------ crash atomicity
def _consistent(path):
    p = Pool.open(path)
    try:
        s = Snapshotter(p)
        assert s.check() == [], s.check()
        rep = p.check()
        assert rep.ok, rep.errors
        return [(i.name, i.kind, i.parent, i.labels) for i in s.walk()], sorted(t.name for t in p.thins())
    finally:
        p.close(commit=False)


def _steps():
    """A scripted sequence of snapshotter mutations (each a function of (snapshotter, pool))."""
    def write(key, at):
        return lambda s, p: s.mounts(key).thin.write(at * BS, b"w" * 100)
    return [
        lambda s, p: s.prepare("b"), write("b", 0), lambda s, p: s.commit("B", "b"),
        lambda s, p: s.prepare("c1", "B"), write("c1", 3), lambda s, p: s.view("v1", "B"),
        lambda s, p: s.commit("C1", "c1"), lambda s, p: s.prepare("c2", "C1"), lambda s, p: s.remove("v1"),
        lambda s, p: s.update(Info("active", "c2", labels={"k": "v"})), lambda s, p: s.remove("c2"),
        lambda s, p: s.remove("C1"),
    ]


def test_crash_between_steps_autocommit(tmp_path):
    """autocommit: a crash (close without commit) after any step loses nothing and is consistent."""
    path = tmp_path / "p"
    Pool.create(path, data_size="16MiB").close()
    expected = []
    for i, step in enumerate(_steps()):
        p = Pool.open(path)
        step(Snapshotter(p, base_size=BASE), p)
        expected = [(i.name, i.kind, i.parent, i.labels) for i in Snapshotter(p).walk()]
        p.close(commit=False)  # crash right after the step
        assert _consistent(path)[0] == expected, i


def test_crash_at_every_commit_point_inside_a_mutation_is_atomic(tmp_path):
    """Let the first k commits of a step through, crash at the next one (k = 0, 1, ...): the pool always
    comes back either exactly before or exactly after the step, consistent -- never a device without its
    record or a record without its device (which two separately committed journals would produce)."""
    path = tmp_path / "p"
    Pool.create(path, data_size="16MiB").close()
    for i, step in enumerate(_steps()):
        before = _consistent(path)
        for k in range(10):
            p = Pool.open(path)
            real, calls = p.commit, [0]

            def crashing(real=real, calls=calls, k=k):
                if calls[0] >= k:
                    raise KeyboardInterrupt("power cut")
                calls[0] += 1
                real()
            p.commit = crashing
            try:
                step(Snapshotter(p, base_size=BASE), p)
                p.commit()  # a plain data write commits nothing by itself
                finished = True
            except KeyboardInterrupt:
                finished = False
            p.close(commit=False)
            now = _consistent(path)
            if finished:
                break
            assert now == before or k > 0, (i, k)  # nothing reaches disk before the first commit
            if now != before:
                break  # the step is durable as a whole
        assert now != before or i in (1, 4), i  # steps 1 and 4 only write data
        assert k < 9


def test_crash_without_autocommit_rolls_back_to_the_last_commit(tmp_path):
    """autocommit=False inside the caller's batch: whatever the crash point, the pool comes back at the
    last commit, consistent."""
    steps = _steps()
    for crash_after in range(len(steps)):
        path = tmp_path / f"p{crash_after}"
        Pool.create(path, data_size="16MiB").close()
        p = Pool.open(path)
        s = Snapshotter(p, base_size=BASE, autocommit=False)
        committed: list = []
        with p.batch():  # the caller's transaction: its messages commit only when it says so
            for i, step in enumerate(steps[: crash_after + 1]):
                step(s, p)
                if i % 3 == 1:
                    p.commit()
                    committed = [(x.name, x.kind, x.parent, x.labels) for x in s.walk()]
            uncommitted = [(x.name, x.kind, x.parent, x.labels) for x in s.walk()]
            p.close(commit=False)
        assert _consistent(path)[0] == committed, crash_after
        if crash_after % 3 != 1:
            assert uncommitted != committed  # the crash really lost something


CHILD = textwrap.dedent("""
    import sys, random
    from thinpool import Pool
    from thinpool.containers.snapshotter import Snapshotter
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    p = Pool.open(path)
    s = Snapshotter(p, base_size=%d)
    n = 0
    print("ready", flush=True)
    while True:
        infos = s.walk()
        committed = [i.name for i in infos if i.kind == "committed"]
        active = [i.name for i in infos if i.kind == "active"]
        r = rng.random()
        key = "k%%d-%%d" %% (seed, n)
        if r < 0.3 or not committed:
            s.prepare(key, rng.choice(committed) if committed and rng.random() < 0.8 else None)
            s.mounts(key).thin.write(rng.randrange(64) * 65536, b"x" * 70000)
        elif r < 0.5 and active:
            s.commit(key, rng.choice(active))
        elif r < 0.6:
            s.view(key, rng.choice(committed))
        else:
            leaves = [i.name for i in infos if not any(j.parent == i.name for j in infos)]
            if len(infos) > 12 and leaves:
                s.remove(rng.choice(leaves))
            else:
                s.prepare(key, rng.choice(committed))
        n += 1
        print(n, flush=True)
""") % BASE


def test_sigkill_at_random_points_never_splits_records_from_devices(tmp_path):
    path = tmp_path / "p"
    Pool.create(path, data_size="64MiB").close()
    rng = random.Random(11)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    total_ops = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(round_)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout.readline().strip() == "ready"
            target = rng.randrange(5, 40)
            for _ in range(target):
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
            time.sleep(rng.random() * 0.01)  # land anywhere inside the next operation
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        total_ops += target
        names, volumes = _consistent(path)
        assert len(volumes) == len(names)  # every device has its record and vice versa
        assert all(v.startswith("snap/default/") for v in volumes)
    assert total_ops >= 15
