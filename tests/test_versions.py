"""Scheduled builds: versions, incremental runs over a growing input, up to date, history,
read(version=), vacuum, concurrent runs.

The three-day simulation runs the real job (Beam DirectRunner in this process, the tiny CNN)
over TFRecord shards of real PNG crops, and checks every version against an independent
from-scratch build over the same input (another output folder, no version to reuse), read
both with `layerbeam.read` and with plain pyarrow on the folder.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import encode_png, example, photo_crops, run_cli, write_tfrecords
from tests.objectstores import s3_server, s3_store  # noqa: F401
from tests.tiny import SIZE, save_tiny_model, tiny_config

IMGS = photo_crops(24, SIZE, seed=3)


def _records(keys: list[str], first: int) -> list[bytes]:
    return [example({"image/encoded": encode_png(IMGS[(first + i) % len(IMGS)]), "image/key": k, "image/class/label": i % 2}) for i, k in enumerate(keys)]


def _write(folder: Path, name: str, keys: list[str], first: int) -> None:
    (p,) = write_tfrecords(folder / "tmp", [_records(keys, first)])
    os.replace(p, folder / name)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.keras")


def _run(pattern, out, model, **kw):
    import layerbeam

    kw.setdefault("output.max_dead_letter_fraction", 0.5)  # the repeated keys are dead letters on purpose
    return layerbeam.run(tiny_config(pattern, str(out), model, **kw))


def _rows(table) -> dict:
    """key → (label, conv1 values) of a layerbeam.read table."""
    conv = table.column("conv1").combine_chunks().to_numpy_ndarray()
    return {k: (lab, conv[i]) for i, (k, lab) in enumerate(zip(table.column("key").to_pylist(), table.column("label").to_pylist()))}


def _plain(folder) -> dict:
    """key → (label, conv1) read by plain pyarrow from the folder (no manifest)."""
    t = pq.read_table(str(folder), partitioning=None)
    return {k: (lab, np.asarray(v, np.float32)) for k, lab, v in zip(t.column("key").to_pylist(), t.column("label").to_pylist(), t.column("conv1").to_pylist())}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][0] == b[k][0], k
        np.testing.assert_allclose(a[k][1], b[k][1], rtol=1e-6, atol=1e-6, err_msg=k)


def _listing(*roots: Path) -> dict:
    out = {}
    for r in roots:
        for dirpath, _, names in os.walk(r):
            for n in names:
                p = Path(dirpath) / n
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _print_plan(pattern, out, model) -> None:
    """The size plan as `layerbeam run --plan-only` prints it (its `versions:` line)."""
    from layerbeam.cli import _console, _print_plan as show
    from layerbeam.config import load_config
    from layerbeam.plan import human, prepare

    plan = prepare(load_config(raw=tiny_config(pattern, str(out), model, **{"output.max_dead_letter_fraction": 0.5})), plan_only=True)
    show(_console(), plan, human)


def _say(day: str, m: dict) -> None:
    d, met = m.get("delta") or {}, m.get("_metrics", {})
    print(
        f"{day}: version {m['version']} (parent {m['parent']}) · plan new {d.get('new', len(m['inputs']))} changed {d.get('changed', 0)} "
        f"reused {d.get('reused', 0)} removed {d.get('removed', 0)} redone {d.get('redone', 0)} · extracted {met.get('shards', 0)} shards, "
        f"{met.get('examples', 0)} examples · {m['counts']['rows_written']} rows, {m['counts']['dead_letters']} dead letters "
        f"({m['counts']['dead_letter_reasons']})"
    )


def test_three_days(tmp_path, model):
    """Day 1: shards a, b, c. Day 2: + 0a (sorts first, repeats a key of a: a is reused but
    loses that row, so its committed file is rewritten) and d (repeats a key of b: d loses it). Day 3: b rewritten with the same
    size and other keys (changed), c deleted, f new; d had lost a key to b, which changed, so
    d is extracted again (and now keeps that key). Each day extracts only those shards, and
    each version equals a from-scratch build, key by key."""
    import layerbeam

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pattern = f"{inp}/*.tfrecord"
    _write(inp, "a.tfrecord", ["a1", "a2", "a3"], 0)
    _write(inp, "b.tfrecord", ["b1", "b2", "b3"], 3)
    _write(inp, "c.tfrecord", ["c1", "c2", "c3"], 6)

    days, scratch = {}, {}

    def day(n: int, extracted: int):
        _print_plan(pattern, out, model)
        m = _run(pattern, out, model)
        days[n] = m
        _say(f"day {n}", m)
        assert m["_metrics"]["shards"] == extracted  # only new, changed and redone shards reach the model
        ref = tmp_path / f"scratch{n}"
        _run(pattern, ref, model)
        scratch[n] = _rows(layerbeam.read(str(ref)))
        _same(_rows(layerbeam.read(str(out))), scratch[n])
        _same(_plain(out), scratch[n])  # a folder reader sees exactly the latest version
        return m

    m1 = day(1, 3)
    assert m1["version"] == 1 and m1["parent"] is None

    _write(inp, "0a.tfrecord", ["x1", "a2", "x3"], 9)  # a2 is also in a: 0a comes first, a loses it
    _write(inp, "d.tfrecord", ["d1", "b3", "d3"], 12)  # b3 is also in b: d loses it
    m2 = day(2, 2)
    assert m2["version"] == 2 and m2["parent"] == 1 and m2["lineage"] == 1
    assert m2["delta"] == {"new": 2, "changed": 0, "reused": 3, "removed": 0, "redone": 0}
    assert m2["counts"]["dead_letter_reasons"] == {"duplicate_key": 2}
    # first wins, in shard order: a (reused) lost a2 to the new 0a, d lost b3 to b (reused)
    lost = {Path(i["paths"][0]).name: (i["reused"], i["dedupe_lost"]) for i in m2["inputs"]}
    assert lost == {"0a.tfrecord": (False, 0), "a.tfrecord": (True, 1), "b.tfrecord": (True, 0), "c.tfrecord": (True, 0), "d.tfrecord": (False, 1)}

    before = (inp / "b.tfrecord").stat().st_size
    _write(inp, "b.tfrecord", ["B1", "B2", "B3"], 3)  # same size, other content
    assert (inp / "b.tfrecord").stat().st_size == before
    (inp / "c.tfrecord").unlink()
    _write(inp, "f.tfrecord", ["f1", "f2"], 15)
    m3 = day(3, 3)
    assert m3["delta"] == {"new": 1, "changed": 1, "reused": 2, "removed": 1, "redone": 1}
    assert "b3" in scratch[3] and "c1" not in scratch[3]  # d keeps b3 now; c's rows are gone

    # earlier versions stay readable, equal to what they were
    for n in (1, 2):
        _same(_rows(layerbeam.read(str(out), version=n)), scratch[n])
    assert "c1" in _rows(layerbeam.read(str(out), version=2))

    # up to date: exit 0, one line, nothing written anywhere (not even staging or a lock)
    roots = [out, Path(f"{out}.layerbeam-staging"), Path(f"{out}.layerbeam-history")]
    snap = _listing(*roots)
    assert not roots[1].exists()
    m = _run(pattern, out, model)
    assert m["_up_to_date"] and m["version"] == 3
    cfg = tmp_path / "job.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config(pattern, str(out), model, **{"output.max_dead_letter_fraction": 0.5})))
    r = run_cli(["run", str(cfg), "-q"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "up to date at version 3", r.stdout
    assert _listing(*roots) == snap and not roots[1].exists()

    # history, show --version, vacuum
    h = run_cli(["history", str(out)])
    assert h.returncode == 0, h.stderr
    print(h.stdout)
    assert [line.split()[0] for line in h.stdout.strip().splitlines()[1:]] == ["1", "2", "3"]
    s = run_cli(["show", str(out), "--version", "1"])
    assert s.returncode == 0 and "version 1" in s.stdout, s.stdout + s.stderr
    v = run_cli(["vacuum", str(out), "--keep", "2"])
    assert v.returncode == 0, v.stderr
    print(v.stdout)
    for n in (2, 3):
        _same(_rows(layerbeam.read(str(out), version=n)), scratch[n])
    _same(_plain(out), scratch[3])
    gone = run_cli(["show", str(out), "--version", "1"])
    assert gone.returncode == 2 and "has no version 1" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    with pytest.raises(layerbeam.OutputError, match="has no version 1"):
        layerbeam.read(str(out), version=1)


def test_changed_extraction_is_refused_then_new_lineage(tmp_path, model):
    """A changed extraction config is refused with the fields that differ; --overwrite builds
    a new lineage, and the old version stays readable."""
    import layerbeam

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _write(inp, "a.tfrecord", ["a1", "a2"], 0)
    pattern = f"{inp}/*.tfrecord"
    m1 = _run(pattern, out, model)
    old = _rows(layerbeam.read(str(out)))
    with pytest.raises(layerbeam.ConfigError, match=r"holds version 1, extracted differently \(differs in layers.reduce"):
        _run(pattern, out, model, **{"layers.reduce": "max"})
    m2 = _run(pattern, out, model, **{"layers.reduce": "max", "output.overwrite": True})
    assert m2["version"] == 2 and m2["lineage"] == 2 and m2["parent"] == 1 and m1["lineage"] == 1
    assert m2["_metrics"]["shards"] == 1
    _same(_rows(layerbeam.read(str(out), version=1)), old)
    assert not np.allclose(_rows(layerbeam.read(str(out)))["a1"][1], old["a1"][1])


def test_incremental_tfrecord_output_renames_reused_files(tmp_path, model):
    """TFRecord outputs: reused files take the new version's TFDS names (their count
    changed); the old version still reads its own."""
    import layerbeam

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pattern = f"{inp}/*.tfrecord"
    _write(inp, "a.tfrecord", ["a1", "a2"], 0)
    _run(pattern, out, model, **{"output.format": "tfrecord"})
    v1 = _rows(layerbeam.read(str(out)))
    _write(inp, "b.tfrecord", ["b1", "b2"], 4)
    m = _run(pattern, out, model, **{"output.format": "tfrecord"})
    assert m["_metrics"]["shards"] == 1
    assert sorted(f["path"].split("-of-")[-1] for f in m["files"]) == ["00002", "00002"]
    _run(pattern, tmp_path / "ref", model, **{"output.format": "tfrecord"})
    _same(_rows(layerbeam.read(str(out))), _rows(layerbeam.read(str(tmp_path / "ref"))))
    _same(_rows(layerbeam.read(str(out), version=1)), v1)


def test_a_run_that_only_removes_shards(tmp_path, model):
    """Only a deletion: no shard reaches the model, the new version drops its rows."""
    import layerbeam

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pattern = f"{inp}/*.tfrecord"
    _write(inp, "a.tfrecord", ["a1", "a2"], 0)
    _write(inp, "b.tfrecord", ["b1", "b2"], 2)
    _run(pattern, out, model)
    (inp / "b.tfrecord").unlink()
    m = _run(pattern, out, model)
    _say("removal only", m)
    assert m["version"] == 2 and m["_metrics"].get("shards", 0) == 0
    assert m["delta"] == {"new": 0, "changed": 0, "reused": 1, "removed": 1, "redone": 0}
    assert sorted(_rows(layerbeam.read(str(out)))) == ["a1", "a2"] == sorted(_plain(out))
    assert sorted(_rows(layerbeam.read(str(out), version=1))) == ["a1", "a2", "b1", "b2"]
    # a commit killed after _SUCCESS, before its cleanup: the next (up-to-date) run finishes it
    left = Path(f"{out}.layerbeam-staging") / m["run_id"] / "shards"
    left.mkdir(parents=True)
    again = _run(pattern, out, model)
    assert again["_up_to_date"] and again["version"] == 2 and not Path(f"{out}.layerbeam-staging").exists()


def test_big_outputs_keep_their_file_lists_in_sidecars(tmp_path, model, monkeypatch):
    """Above `versions.FILES_INLINE` files the manifest names Parquet sidecars instead of
    listing files and inputs (a reader loads one column, not a JSON of every file): the
    incremental step, read(version=), history and vacuum work the same, and folder readers
    skip the sidecars (`_`-prefixed)."""
    import json

    import layerbeam
    from layerbeam.transforms import versions

    monkeypatch.setattr(versions, "FILES_INLINE", 0)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pattern = f"{inp}/*.tfrecord"
    _write(inp, "a.tfrecord", ["a1", "a2"], 0)
    _run(pattern, out, model)
    v1 = _rows(layerbeam.read(str(out)))
    _write(inp, "0a.tfrecord", ["a2", "z2"], 2)  # the reused shard a loses a2: rewritten
    m = _run(pattern, out, model)
    on_disk = json.loads((out / "_manifest.json").read_text())
    assert "files" not in on_disk and "inputs" not in on_disk and on_disk["files_count"] == 2
    assert (out / on_disk["files_file"]).exists() and m["_metrics"]["shards"] == 1
    _run(pattern, tmp_path / "ref", model)
    ref = _rows(layerbeam.read(str(tmp_path / "ref")))
    _same(_rows(layerbeam.read(str(out))), ref)
    _same(_plain(out), ref)
    _same(_rows(layerbeam.read(str(out), version=1)), v1)
    assert run_cli(["history", str(out)]).returncode == 0
    assert run_cli(["vacuum", str(out), "--keep", "1"]).returncode == 0
    _same(_rows(layerbeam.read(str(out))), ref)


def test_incremental_on_s3(tmp_path, model, s3_store):
    """One incremental step on an S3 API server: equal to a local from-scratch build; the
    first version stays readable from the history prefix."""
    import layerbeam

    inp = tmp_path / "in"
    inp.mkdir()
    pattern = f"{inp}/*.tfrecord"
    out = f"{s3_store.url}/out"
    _write(inp, "a.tfrecord", ["a1", "a2", "a3"], 0)
    _write(inp, "b.tfrecord", ["b1", "b2"], 3)
    _run(pattern, out, model)
    v1 = _rows(layerbeam.read(out))
    _write(inp, "0a.tfrecord", ["a2", "z2"], 6)  # sorts first and repeats a key of the reused shard a
    m = _run(pattern, out, model)
    _say("s3 day 2", m)
    assert m["version"] == 2 and m["_metrics"]["shards"] == 1 and m["delta"]["reused"] == 2
    _run(pattern, tmp_path / "ref", model)
    _same(_rows(layerbeam.read(out)), _rows(layerbeam.read(str(tmp_path / "ref"))))
    _same(_rows(layerbeam.read(out, version=1)), v1)
    # the prefix holds exactly version 2's data files
    listed = {p.split("/out/", 1)[1] for p in s3_store.fs.find(f"{s3_store.path}/out") if p.endswith(".parquet") and "/_dead_letters/" not in p}
    assert listed == {f["path"] for f in m["files"]}


def test_two_concurrent_runs_on_s3_one_commits(tmp_path, model, s3_store):
    """Two processes run the same job for one S3 output at once: exactly one commits; the
    other is refused naming the run that holds the output (or, if it planned after the
    commit, finds it up to date)."""
    import subprocess
    import sys

    import yaml

    inp = tmp_path / "in"
    inp.mkdir()
    _write(inp, "a.tfrecord", ["a1", "a2"], 0)
    out = f"{s3_store.url}/out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(f"{inp}/*.tfrecord", out, model)))
    # both wait on a file before planning, so they take the lock at nearly the same moment
    go = tmp_path / "go"
    code = (
        "import sys, time, pathlib\n"
        "from layerbeam.cli import main\n"
        "import tensorflow, apache_beam\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        f"sys.exit(main(['run', {str(cfg)!r}, '-q']))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    import time

    time.sleep(20)  # both imported TensorFlow and Beam
    go.write_text("go")
    done = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    print("concurrent:", [(c, o.strip()[-120:], e.strip().splitlines()[-1][:300] if e.strip() else "") for c, (o, e) in zip(codes, done)])
    versions = [p for p in s3_store.fs.find(f"{s3_store.path}/out.layerbeam-history/_versions")]
    assert len(versions) == 1  # exactly one commit
    ok = [i for i, c in enumerate(codes) if c == 0]
    assert len(ok) >= 1
    for i, c in enumerate(codes):
        if c != 0:
            err = done[i][1]
            assert c == 2 and ("is being written by another run" in err or "moved to version" in err or "appeared during the run" in err), err
        elif "up to date" in done[i][0]:
            assert len(ok) == 2  # the other committed
