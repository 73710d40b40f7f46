"""Atomic, idempotent, resumable builds: a killed run resumes to the same output as an
uninterrupted one, a retried shard leaves one copy, a reader never sees a mix, and runs
that must not write an output are refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from layerbeam.plan import prepare
from layerbeam.run import run_job
from layerbeam.config import load_config
from tests.conftest import ROOT, encode_png, example, photo_crops, read_manifest, run_cli, write_tfrecords
from tests.tiny import SIZE, save_tiny_model, tiny_config
from tests.objectstores import s3_server, s3_store  # noqa: F401  (fixtures)
from layerbeam.transforms.readback import to_arrow

SHARDS = 12


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """12 TFRecord shards of 2 records, the tiny model, and an uninterrupted run's output."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(root / "tiny.keras")
    imgs = photo_crops(2 * SHARDS, SIZE, seed=2)
    recs = [example({"image/encoded": encode_png(im), "image/key": f"k{i:03d}", "image/class/label": i % 3}) for i, im in enumerate(imgs)]
    write_tfrecords(root / "data", [recs[i : i + 2] for i in range(0, len(recs), 2)])
    cfg = tiny_config(f"{root}/data/*.tfrecord", f"{root}/reference", model, **{"batching.batch_size": 1})
    run_job(load_config(raw=cfg))
    return root, model, cfg, _sorted_table(root / "reference")


def _sorted_table(out) -> pa.Table:
    t = to_arrow(str(out))
    return t.sort_by("key")


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _popen(args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from layerbeam.cli import main; sys.exit(main())", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _markers(out: Path) -> list[Path]:
    return list(Path(f"{out}.layerbeam-staging").glob("*/shards/*.done.json"))


def _kill_when(proc, ready, timeout=120.0) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("the run never reached the point to kill it")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("when", ["after_some_shards", "before_any_shard"])
def test_sigkilled_run_resumes_to_the_uninterrupted_output(many_shards, tmp_path, when):
    root, model, cfg, reference = many_shards
    out = tmp_path / "out"
    config = _write_config(tmp_path / "job.yaml", dict(cfg, output={"path": str(out)}))
    proc = _popen(["run", str(config), "-q"])
    if when == "after_some_shards":
        _kill_when(proc, lambda: len(_markers(out)) >= 3)
    else:  # the run has taken the lock and staged its run info, no shard is done
        _kill_when(proc, lambda: bool(list(Path(f"{out}.layerbeam-staging").glob("*/_run.json"))))
    done = len(_markers(out))
    assert not (out / "_SUCCESS").exists()
    if when == "after_some_shards":
        assert 3 <= done < SHARDS, done
    else:
        assert done < SHARDS  # killed before the run could finish
    # The killed run's lock is stale (its process is gone): the re-run takes it over.
    r = run_cli(["run", str(config), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["counts"] == {"records_read": 2 * SHARDS, "rows_written": 2 * SHARDS, "dead_letters": 0, "dead_letter_reasons": {}}
    got = _sorted_table(out)
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 2 * SHARDS
    assert got.equals(reference)
    assert not Path(f"{out}.layerbeam-staging").exists()
    print(f"{when}: killed with {done}/{SHARDS} shards done; re-run wrote {len(keys)} rows, each key once, equal to the uninterrupted run")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_run_sigkilled_during_extraction_resumes_without_recomputing(many_shards, tmp_path, request, kind):
    """`layerbeam run` (a real process) writing to a local folder or to S3 (moto's server) is
    SIGKILLed during extraction, after some shards finished; the re-run takes over the stale
    lock, extracts only the unfinished shards (Beam metrics `shards_resumed` = the markers
    left, `examples` = the rest), and ends equal to the uninterrupted run, each example once,
    with no staging left."""
    from tests.objectstores import clear_fsspec_caches

    root, model, cfg, reference = many_shards
    if kind == "s3":
        st = request.getfixturevalue("s3_store")
        out, fs, path = f"{st.url}/out", st.fs, f"{st.path}/out"
    else:
        import fsspec

        out = path = str(tmp_path / "out")
        fs = fsspec.filesystem("file")

    def markers() -> list:
        fs.invalidate_cache()
        return fs.glob(f"{path}.layerbeam-staging/*/shards/*.done.json")

    config = _write_config(tmp_path / "job.yaml", dict(cfg, output={"path": out}))
    proc = _popen(["run", str(config), "-q"])
    _kill_when(proc, lambda: len(markers()) >= 3)
    done = len(markers())
    assert 3 <= done < SHARDS and not fs.exists(f"{path}/_SUCCESS"), done
    clear_fsspec_caches()
    again = run_job(load_config(raw=dict(cfg, output={"path": out})))
    metrics = again["_metrics"]
    assert metrics["shards_resumed"] == done and metrics["examples"] == 2 * (SHARDS - done), metrics
    got = to_arrow(out).sort_by("key")
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 2 * SHARDS
    assert got.equals(reference)
    fs.invalidate_cache()
    assert not fs.exists(f"{path}.layerbeam-staging") or fs.find(f"{path}.layerbeam-staging") == []
    print(f"{kind}: killed with {done}/{SHARDS} shards done; the re-run resumed {metrics['shards_resumed']} and extracted {metrics['examples']} examples")


def test_a_retried_shard_leaves_one_copy(many_shards, tmp_path):
    from layerbeam.plan import manifest_base
    from layerbeam.transforms.commit import commit_run
    from layerbeam.transforms.shard import ShardProcessor
    from layerbeam.transforms.readers import match_shards

    root, model, cfg, reference = many_shards
    job = load_config(raw=dict(cfg, output={"path": str(tmp_path / "out")}))
    plan = prepare(job)
    proc = ShardProcessor(plan.spec, plan.run_id)
    shards = match_shards(job.input.pattern, "tfrecord")[:2]
    first = proc.process(shards[0])
    # A worker died after writing the files but before the marker; the retry is another
    # attempt, in its own folder: it never touches the first attempt's files.
    os.remove(proc.layout.marker(shards[0].id))
    again = proc.process(shards[0])
    assert again.attempt != first.attempt
    for r in (first, again):
        files = sorted(p.name for p in Path(proc.layout.shard_dir(shards[0].id, r.attempt)).rglob("*.parquet") if not p.name.startswith("_"))
        assert files == [f["path"] for f in r.files]
    # A marker present: the shard is not processed again.
    before = {p: p.stat().st_mtime_ns for p in Path(proc.layout.shard_dir(shards[0].id)).rglob("*.parquet")}
    assert proc.process(shards[0]).resumed is True
    assert before == {p: p.stat().st_mtime_ns for p in Path(proc.layout.shard_dir(shards[0].id)).rglob("*.parquet")}
    results = [proc.process(shards[0]), proc.process(shards[1])]
    commit_run(results, shards, manifest_base(plan), plan.run_id)
    got = _sorted_table(tmp_path / "out")
    assert got.column("key").to_pylist() == ["k000", "k001", "k002", "k003"]
    assert got.equals(reference.slice(0, 4))
    # only the accepted attempt was committed; the other attempt's files are gone with staging
    assert not Path(f"{tmp_path / 'out'}.layerbeam-staging", plan.run_id).exists()
    # a second commit after success is a no-op that succeeds
    assert commit_run(results, shards, manifest_base(plan), plan.run_id)["rows_written"] == 4


def test_a_reader_during_a_run_sees_nothing_or_the_previous_complete_output(many_shards, tmp_path):
    root, model, cfg, reference = many_shards
    out = tmp_path / "out"
    run_job(load_config(raw=dict(cfg, output={"path": str(out)})))
    old = _sorted_table(out)
    new_cfg = dict(cfg, output={"path": str(out)}, layers={"select": ["conv2"], "reduce": "mean"})
    config = _write_config(tmp_path / "job.yaml", new_cfg)
    seen: list[str] = []
    tables: list[pa.Table] = []
    stop = threading.Event()

    def read_loop():
        while not stop.is_set():
            try:
                t = to_arrow(str(out)).sort_by("key")
            except FileNotFoundError:
                seen.append("nothing")
                continue
            seen.append("table")
            tables.append(t)
            time.sleep(0.01)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        r = run_cli(["run", str(config), "--overwrite", "-q"])
    finally:
        stop.set()
        reader.join()
    assert r.returncode == 0, r.stderr[-3000:]
    new = _sorted_table(out)
    assert "conv2" in new.column_names and new.num_rows == old.num_rows
    kinds = ["old" if t.equals(old) else "new" if t.equals(new) else "MIX" for t in tables]
    assert "MIX" not in kinds
    assert "old" in kinds  # the reader did look while the run was building
    assert seen.count("table") == len(tables)


def test_a_second_run_writing_the_same_output_is_refused(many_shards, tmp_path):
    import socket

    from layerbeam.config import ConfigError
    from layerbeam.transforms.commit import OutputLock
    from layerbeam.transforms.staging import OutputLayout

    root, model, cfg, _ = many_shards
    out = tmp_path / "out"
    job = load_config(raw=dict(cfg, output={"path": str(out)}))
    staging = Path(f"{out}.layerbeam-staging")
    staging.mkdir()
    alive = os.getppid()  # a live process on this host, not this one
    (staging / "_lock.0").write_text(json.dumps({"pid": alive, "host": socket.gethostname(), "run_id": "other", "since": "now"}))
    with pytest.raises(ConfigError, match=f"being written by another run \\(pid {alive} on"):
        prepare(job)
    with pytest.raises(ConfigError, match="delete .*_lock.0"):
        OutputLock(OutputLayout(str(out), "mine")).acquire()
    # A lock whose process is gone (a killed run) is stale and taken over, with the next number.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (staging / "_lock.0").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "run_id": "other", "since": "now"}))
    a = OutputLock(OutputLayout(str(out), "a"))
    a.acquire()
    lock = json.loads((staging / "_lock.1").read_text())
    assert lock["pid"] == os.getpid() and lock["run_id"] == "a"
    a.release()  # marked released; only lock files were left, so the staging folder went with it
    b = OutputLock(OutputLayout(str(out), "b"))
    b.acquire()
    assert json.loads(Path(b.lock_path).read_text())["run_id"] == "b"
    b.release()
    assert not staging.exists()


def test_a_different_config_against_a_half_built_output_is_refused(many_shards, tmp_path):
    root, model, cfg, _ = many_shards
    out = tmp_path / "out"
    config = _write_config(tmp_path / "a.yaml", dict(cfg, output={"path": str(out)}))
    proc = _popen(["run", str(config), "-q"])
    _kill_when(proc, lambda: len(_markers(out)) >= 1)
    other = _write_config(tmp_path / "b.yaml", dict(cfg, output={"path": str(out)}, layers={"select": ["conv2"], "reduce": "mean"}))
    from layerbeam.config import ConfigError

    b = load_config(str(other))
    with pytest.raises(ConfigError, match="half-built run .* from a different config \\(differs in layers.select\\).*--overwrite"):
        prepare(b)
    run_job(load_config(str(other), ["output.overwrite=true"]))
    assert "conv2" in _sorted_table(out).column_names
    assert not Path(f"{out}.layerbeam-staging").exists()


def test_an_existing_complete_output_is_refused_without_overwrite(many_shards, tmp_path):
    from layerbeam.config import ConfigError

    root, model, cfg, _ = many_shards
    with pytest.raises(ConfigError, match="already holds a complete output; pass --overwrite"):
        prepare(load_config(raw=dict(cfg, output={"path": str(root / "reference")})))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that layerbeam did not write"):
        prepare(load_config(raw=dict(cfg, output={"path": str(tmp_path / "foreign")})))
