"""The commit on local disk and real S3 (moto) and GCS (fake-gcs-server) API servers, with
synthetic staged runs (real Parquet files, key hashes and markers as workers leave them; no
model): attempts isolated and verified, the atomic lock, idempotent re-runs (also after a
SIGKILL at each step), the distributed Beam commit, overwrite, and requests per file."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scripts._request_counter import count_requests
from scripts.bench_commit import manifest_base, stage_run
from tests.objectstores import gcs_server, gcs_store, local_store, s3_server, s3_store, store  # noqa: F401

SHARDS, ROWS = 4, 50


def _read(store, out: str) -> pa.Table:
    """The committed rows, through the manifest (what `layerbeam.read` reads), sorted by key."""
    fs = store.fs
    out = fs._strip_protocol(out)
    fs.invalidate_cache()
    assert fs.exists(f"{out}/_SUCCESS")
    m = json.loads(fs.cat(f"{out}/_manifest.json"))
    tables = []
    for f in m["files"]:
        with fs.open(f"{out}/{f['path']}", "rb") as fh:
            tables.append(pq.read_table(fh))
    t = pa.concat_tables(tables) if tables else pa.table({"key": pa.array([], pa.string())})
    return t.sort_by("key")


def _expected(repeat_every: int) -> list[str]:
    keys = set()
    for i in range(SHARDS):
        keys.update(f"k{i * ROWS + j:012d}" for j in range(10 if repeat_every and i and i % repeat_every == 0 else 0, ROWS))
    return sorted(keys)


def _staging_left(store, out: str) -> list[str]:
    fs = store.fs
    fs.invalidate_cache()
    root = f"{fs._strip_protocol(out)}.layerbeam-staging"
    return fs.find(root) if fs.exists(root) else []


def _out(store) -> str:
    """The output URL (a plain path locally)."""
    return f"{store.url}/out"


def test_commit_dedupes_publishes_and_is_a_no_op_when_run_again(store):
    from layerbeam.transforms.commit import commit_run

    out = _out(store)
    results, shards = stage_run(out, "r1", SHARDS, ROWS, repeat_every=2)
    counts = commit_run(results, shards, manifest_base(out, "r1"), "r1")
    assert counts["rows_written"] == SHARDS * ROWS - 10 and counts["dead_letter_reasons"] == {"duplicate_key": 10}
    got = _read(store, out)
    assert got.column("key").to_pylist() == _expected(2)
    path = store.fs._strip_protocol(out)
    m = json.loads(store.fs.cat(f"{path}/_manifest.json"))
    assert b"\n" not in store.fs.cat(f"{path}/_manifest.json")  # compact
    dead = pq.read_table(store.fs.open(f"{path}/{m['dead_letter_files'][0]}", "rb"))
    assert dead.column("reason").to_pylist() == ["duplicate_key"] * 10
    assert "already written by record 0 of shard s00001" in dead.column("detail")[0].as_py()
    assert _staging_left(store, out) == []
    listed = sorted(p.rsplit("/out/", 1)[1] for p in store.fs.find(store.fs._strip_protocol(out)))
    assert listed == sorted(["_SUCCESS", "_manifest.json", *m["dead_letter_files"], *(f["path"] for f in m["files"])])
    # a second commit after success succeeds and changes nothing
    assert commit_run(results, shards, manifest_base(out, "r1"), "r1") == counts
    assert _read(store, out).equals(got)


def test_memory_filesystem_names_files_inside_the_output():
    import fsspec

    from layerbeam.transforms.commit import commit_run

    out = "memory://commit-test/out"
    results, shards = stage_run(out, "m1", 2, 5)
    commit_run(results, shards, manifest_base(out, "m1"), "m1")
    fs = fsspec.filesystem("memory")
    m = json.loads(fs.cat("/commit-test/out/_manifest.json"))
    assert all(fs.exists(f"/commit-test/out/{f['path']}") for f in m["files"])
    fs.rm("/commit-test", recursive=True)


def test_only_the_accepted_attempt_is_committed_and_it_is_verified(store):
    """Two attempts of one shard (a zombie): one complete, one killed late with a truncated
    file and its marker last. The accepted result's attempt is committed, exactly once; a
    result whose files were damaged is refused before anything is published."""
    from layerbeam.transforms.commit import commit_run
    from layerbeam.transforms.errors import CommitError

    out = _out(store)
    results, shards = stage_run(out, "r2", SHARDS, ROWS)
    zombie, _ = stage_run(out, "r2", 1, ROWS)  # another attempt of s00000 (same rows)
    z = zombie[0]
    zpath = f"{store.path}/out.layerbeam-staging/r2/shards/s00000/{z['attempt']}/{z['files'][0]['path']}"
    store.fs.pipe_file(zpath, store.fs.cat(zpath)[:-40])  # killed late: truncated
    with pytest.raises(CommitError, match="holds .* bytes but its attempt reported"):
        commit_run([z, *results[1:]], shards, manifest_base(out, "r2"), "r2")
    assert not store.fs.exists(f"{store.path}/out/_SUCCESS")
    commit_run(results, shards, manifest_base(out, "r2"), "r2")
    keys = _read(store, out).column("key").to_pylist()
    assert keys == _expected(0) and len(keys) == len(set(keys))
    assert _staging_left(store, out) == []


def test_a_footer_that_disagrees_with_the_result_is_refused(local_store):
    from layerbeam.transforms.commit import commit_run
    from layerbeam.transforms.errors import CommitError

    out = _out(local_store)
    results, shards = stage_run(out, "r3", 2, ROWS)
    lied = dict(results[0], files=[dict(results[0]["files"][0], rows=ROWS + 1)], rows=ROWS + 1, read=ROWS + 1)
    with pytest.raises(CommitError, match=f"holds {ROWS} rows but its attempt reported {ROWS + 1}"):
        commit_run([lied, results[1]], shards, manifest_base(out, "r3"), "r3")


_KILL = textwrap.dedent(
    """
    import json, os, signal, sys
    from layerbeam.transforms import commit
    from layerbeam.transforms.staging import OutputLayout
    from scripts.bench_commit import manifest_base
    out, run, where, results, shards = json.loads(sys.argv[1])
    layout = OutputLayout(out, run)
    base = manifest_base(out, run, overwrite=True)
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "rewrite":  # killed inside the duplicate-key rewrite, its file half-written
        from layerbeam.transforms import formats
        real = formats.rewrite_without
        def half(fs, src, dst, keep):
            with fs.open(dst + ".x.tmp", "wb") as f:
                f.write(b"PAR1 half")
            die()
        commit.rewrite_without = half
    from layerbeam.transforms.readers import Shard
    shards = [Shard(*s) for s in shards]
    assert commit.check_results([commit.brief(r) for r in results], shards, base, run)
    if where == "dedupe":
        parts = [p for r in results for p in commit.key_parts(layout, r)]
        die()
    repeats, buckets = {}, {}
    for r in results:
        for b, part in commit.key_parts(layout, r):
            buckets.setdefault(b, []).append(part)
    for b in buckets:
        for s, rows in commit.find_repeats(buckets[b]):
            repeats.setdefault(s, []).extend(rows)
    summaries = []
    for i, r in enumerate(results):
        if where == "publish" and i == len(results) // 2:
            die()
        summaries.append(commit.publish_shard(layout, r, repeats.get(r["shard"], ())))
    if where == "success":  # the manifest written, _SUCCESS not
        real_pipe = layout.fs.pipe_file
        def pipe(path, data, **kw):
            real_pipe(path, data, **kw)
            if path.endswith("_manifest.json"):
                die()
        layout.fs.pipe_file = pipe
        if layout.fs.protocol in ("file", ("file", "local")):
            real_rename = os.rename
            def rename(a, b):
                die()
            os.rename = rename
    commit.finalize(layout, summaries, base)
    """
)


@pytest.mark.parametrize("where", ["dedupe", "rewrite", "publish", "success"])
def test_a_commit_killed_at_any_step_completes_when_run_again(store, where):
    """SIGKILL during the dedupe, inside the duplicate-key rewrite, part-way through
    publishing, and between the manifest and `_SUCCESS`; then the commit is run again: the
    output equals an uninterrupted commit's, each row once, no staging left; a previous
    complete output (overwrite) stays readable until the new one is complete."""
    from layerbeam.transforms.commit import commit_run

    out = _out(store)
    old, old_shards = stage_run(out, "old", 2, 5)
    commit_run(old, old_shards, manifest_base(out, "old"), "old")
    before = _read(store, out)
    results, shards = stage_run(out, "r4", SHARDS, ROWS, repeat_every=2)
    arg = json.dumps([out, "r4", where, results, [[s.id, list(s.paths), s.size] for s in shards]])
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-c", _KILL, arg], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    store.fs.invalidate_cache()
    if store.name != "local" or where != "success":
        # the old complete output is still what the manifest names (local: until the rename)
        if not (store.name != "local" and where == "success"):
            assert _read(store, out).equals(before)
    commit_run(results, shards, manifest_base(out, "r4", overwrite=True), "r4")
    keys = _read(store, out).column("key").to_pylist()
    assert keys == _expected(2)
    assert _staging_left(store, out) == []
    m = json.loads(store.fs.cat(f"{store.path}/out/_manifest.json"))
    listed = sorted(p.rsplit("/out/", 1)[1] for p in store.fs.find(f"{store.path}/out"))
    assert listed == sorted(["_SUCCESS", "_manifest.json", *m["dead_letter_files"], *(f["path"] for f in m["files"])])


def test_the_beam_commit_equals_the_in_process_commit(store):
    """`CommitShards` (check → bucketed dedupe through a GroupByKey → parallel publish →
    finalize → cleanup) on the DirectRunner gives what `commit_run` gives."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from layerbeam.transforms.beam import CommitShards
    from layerbeam.transforms.commit import inputs_digest

    out = url_out = _out(store)
    results, shards = stage_run(url_out, "r5", SHARDS, ROWS, repeat_every=2)
    with beam.Pipeline() as p:
        got = p | "Results" >> beam.Create(results) | CommitShards(p | "Shards" >> beam.Create(shards), manifest_base(url_out, "r5"), "r5", inputs_digest(shards), buckets=8)
        assert_that(got | beam.Map(lambda c: c["rows_written"]), equal_to([SHARDS * ROWS - 10]))
    assert _read(store, out).column("key").to_pylist() == _expected(2)
    assert _staging_left(store, out) == []


def _take_lock(args):
    """One process of the lock race: `threads` threads each try to take a stale lock."""
    from layerbeam.transforms.commit import OutputLock
    from layerbeam.transforms.errors import ConfigError
    from layerbeam.transforms.staging import OutputLayout

    out, threads = args
    barrier = threading.Barrier(threads)
    won = []

    def one(i):
        lock = OutputLock(OutputLayout(out, f"run{os.getpid()}-{i}"))
        barrier.wait()
        try:
            lock.acquire()
            # the lock is per process (re-entrant for its other threads): count who created it
            won.append("created" if lock._held else "same process")
        except ConfigError:
            pass

    ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return won


def test_200_concurrent_stale_lock_takeovers_give_one_holder(store):
    import socket

    out = _out(store)
    stale = {"pid": 2**22 + 12345, "host": socket.gethostname(), "run_id": "dead", "since": "then"}  # no such pid
    root = f"{store.path}/out.layerbeam-staging"
    store.fs.makedirs(root, exist_ok=True)
    store.fs.pipe_file(f"{root}/_lock.0", json.dumps(stale).encode())
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # 2 processes × 100 threads, each its own lock
        per_process = pool.map(_take_lock, [(out, 100)] * 2)
    won = [w for ws in per_process for w in ws]
    assert won.count("created") == 1, f"{won.count('created')} holders"
    assert sum(1 for ws in per_process if ws) == 1  # every thread of the other process was refused


def test_a_same_size_rewrite_of_an_input_changes_its_identity(store):
    from layerbeam.transforms.commit import inputs_digest
    from layerbeam.transforms.readers import match_shards

    folder = f"{store.path}/in"
    store.fs.makedirs(folder, exist_ok=True)
    store.fs.pipe_file(f"{folder}/a.tfrecord", b"a" * 100)
    url = folder if store.name == "local" else f"{store.url}/in"
    before = match_shards(url, "tfrecord")
    store.fs.pipe_file(f"{folder}/a.tfrecord", b"b" * 100)
    store.fs.invalidate_cache()
    after = match_shards(url, "tfrecord")
    assert before[0].size == after[0].size == 100
    assert before[0].version != after[0].version
    assert inputs_digest(before) != inputs_digest(after)


def test_requests_per_file(s3_store, gcs_store, request):
    """Storage requests of the publish step per data file, on S3 and GCS: one server-side
    copy per file plus the per-shard listing and footer check; none sequential across files
    on one worker (shards publish in parallel)."""
    from layerbeam.transforms import commit
    from layerbeam.transforms.staging import OutputLayout

    n = int(os.environ.get("BENCH_FILES", "16"))
    for st in (s3_store, gcs_store):
        out = f"{st.url}/out"
        results, shards = stage_run(out, "rq", n // 4, 8, files_per_shard=4)
        layout = OutputLayout(out, "rq")
        assert commit.check_results([commit.brief(r) for r in results], shards, manifest_base(out, "rq"), "rq")
        with count_requests(store=st.name) as c:
            summaries = [commit.publish_shard(layout, r, ()) for r in results]
        with count_requests(store=st.name) as f:
            commit.finalize(layout, summaries, manifest_base(out, "rq"))
        per = c.total / n
        print(f"\n{st.name}: publish {c.total} requests for {n} files ({per:.2f}/file) {c.by_kind}; finalize {f.total} {f.by_kind}")
        copies = sum(v for k, v in c.by_kind.items() if "copy" in k or "rewrite" in k)
        assert copies == n, c.by_kind
        assert per <= 2.5, c.by_kind
        commit.cleanup_run(layout)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """4 TFRecord shards of 3 records (one key repeated across shards), the tiny model, and a
    local run's output as the reference."""
    from layerbeam.config import load_config
    from layerbeam.run import run_job
    from tests.conftest import encode_png, example, photo_crops, write_tfrecords
    from tests.tiny import SIZE, save_tiny_model, tiny_config

    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_model(root / "tiny.keras")
    imgs = photo_crops(12, SIZE, seed=3)
    keys = [f"k{i:03d}" for i in range(12)]
    keys[7] = keys[1]  # shard 2 repeats a key of shard 0: the distributed dedupe drops it
    recs = [example({"image/encoded": encode_png(im), "image/key": k, "image/class/label": i % 3}) for i, (im, k) in enumerate(zip(imgs, keys))]
    write_tfrecords(root / "data", [recs[i : i + 3] for i in range(0, 12, 3)])
    cfg = tiny_config(f"{root}/data/*.tfrecord", f"{root}/reference", model, **{"batching.batch_size": 4})
    ref = run_job(load_config(raw=cfg))
    return cfg, ref


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_job_writes_to_an_object_store_equal_to_a_local_run(request, kind, tiny_job):
    """`layerbeam run` (the Beam job, DirectRunner) writing to s3:// and gs:// on the API
    servers reads back (through the manifest) equal to the local run."""
    from layerbeam.config import load_config
    from layerbeam.run import run_job
    from layerbeam.transforms.readback import to_arrow

    st = request.getfixturevalue(f"{kind}_store")
    cfg, ref = tiny_job
    out = f"{st.url}/out"
    got = run_job(load_config(raw=dict(cfg, output=dict(cfg["output"], path=out))))
    assert got["counts"] == ref["counts"] and got["counts"]["dead_letter_reasons"] == {"duplicate_key": 1}
    local = to_arrow(cfg["output"]["path"]).sort_by("key")
    remote = to_arrow(out).sort_by("key")
    assert remote.equals(local)
    assert _staging_left(st, out) == []


def test_a_partition_by_over_the_file_cap_is_refused_before_work(tmp_path):
    """`images` partitioned by label: the parent folders in the listing give each shard's
    labels, hence the projected data files; over `output.max_files` the run is refused."""
    from layerbeam.config import ConfigError, load_config
    from layerbeam.plan import prepare
    from tests.conftest import encode_png, photo_crops
    from tests.tiny import SIZE, save_tiny_model, tiny_config

    model = save_tiny_model(tmp_path / "tiny.keras")
    imgs = photo_crops(6, SIZE, seed=5)
    for i, im in enumerate(imgs):  # 3 labels, shards cut per folder: [a a] [b b] [c c] → 3 files
        d = tmp_path / "data" / "abc"[i // 2]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(encode_png(im))
    cfg = tiny_config(f"{tmp_path}/data", f"{tmp_path}/out", model, **{"input.format": "images", "input.files_per_shard": 4, "output.partition_by": ["label"], "output.max_files": 2})
    del cfg["input"]["key_feature"], cfg["input"]["label_feature"]
    with pytest.raises(ConfigError, match=r"with 3 input shards would write ~3 data files, over output.max_files = 2.*--set output.max_files=3"):
        prepare(load_config(raw=cfg))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.layerbeam-staging").exists()
    cfg["output"]["max_files"] = 3
    assert prepare(load_config(raw=cfg)).shards == 3
