"""`images` input at scale (issue 13 item 6): listed per folder inside the pipeline, shards
described by their span `(folder, first, last, count)` and version, never by their paths;
nothing per image in the launcher, `_run.json`, the shard side input, the results or the
manifest. Real files, the real CLI, Keras's own predict as the reference."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import encode_png, photo_crops, read_manifest, run_cli
from tests.tiny import SIZE, reference, save_tiny_model, tiny_config


def _bmp(img: np.ndarray) -> bytes:
    """Uncompressed: every 32×32 image is the same number of bytes (a same-size rewrite)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="BMP")
    return buf.getvalue()


def _tree(root: Path, per_folder: dict[str, int], seed: int = 0, fmt=encode_png, ext="png") -> dict[str, np.ndarray]:
    """Folders of real photo crops; {path: pixels}."""
    out = {}
    for j, (name, n) in enumerate(sorted(per_folder.items())):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(photo_crops(n, SIZE, seed=seed + j)):
            p = d / f"{i:03d}.{ext}"
            p.write_bytes(fmt(im))
            out[str(p)] = im
    return out


def _config(data: Path, out: Path, model: Path, **overrides) -> dict:
    cfg = tiny_config(str(data), str(out), model, **{"input.format": "images", **overrides})
    del cfg["input"]["key_feature"], cfg["input"]["label_feature"]
    return cfg


def _check_rows(out: Path, model: Path, images: dict[str, np.ndarray]) -> None:
    """Every image's row equals Keras predict on it, key by key; label = its folder."""
    import layerbeam

    table = layerbeam.read(str(out))
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(images)
    assert table.column("label").to_pylist() == [Path(k).parent.name for k in keys]
    got = table.column("conv1").combine_chunks().to_numpy_ndarray()
    np.testing.assert_allclose(got, reference(model, "conv1", np.stack([images[k] for k in keys])), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny.keras")


def test_cli_run_over_folders_equals_keras_predict_and_describes_shards_compactly(tmp_path, model):
    images = _tree(tmp_path / "data", {"cat": 5, "dog": 3, "owl": 1})
    (tmp_path / "data" / "dog" / "deep").mkdir()
    images.update(_tree(tmp_path / "data" / "dog" / "deep", {"pup": 2}, seed=9))  # a `**` walk reaches it
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path / "data", tmp_path / "out", model, **{"input.files_per_shard": 2})))
    r = run_cli(["run", str(cfg), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    _check_rows(tmp_path / "out", model, images)
    m = read_manifest(tmp_path / "out")
    # per folder, groups of 2 in name order: cat [0 1] [2 3] [4], dog [0 1] [2], owl [0], pup [0 1]
    spans = sorted((Path(i["prefix"]).name, i["first"], i["last"], i["count"]) for i in m["inputs"])
    assert spans == [("cat", "000.png", "001.png", 2), ("cat", "002.png", "003.png", 2), ("cat", "004.png", "004.png", 1),
                     ("dog", "000.png", "001.png", 2), ("dog", "002.png", "002.png", 1), ("owl", "000.png", "000.png", 1),
                     ("pup", "000.png", "001.png", 2)]
    assert all("paths" not in i and i["version"] and i["records"] == i["count"] for i in m["inputs"])
    from layerbeam.transforms.readers import match_shards, shard_identity

    # what a later version (issue 15) matches shards by: the manifest's entries and a new listing agree
    assert {shard_identity(i) for i in m["inputs"]} == {shard_identity(s) for s in match_shards(str(tmp_path / "data"), "images", 2)}
    assert m["shards_planned"] == m["shards_total"] == 7 and m["counts"]["rows_written"] == 11
    r = run_cli(["show", str(tmp_path / "out")])
    assert r.returncode == 0 and "rows: 11" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    r = run_cli(["verify", str(tmp_path / "out"), "--sample", "100"])
    assert r.returncode == 0 and "ok: every output" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    # a smoke run keeps the first shards in path order; the plan says how many of how many
    r = run_cli(["run", str(cfg), "-q", "--max-shards", "2", "--set", f"output.path={tmp_path / 'smoke'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    smoke = read_manifest(tmp_path / "smoke")
    assert smoke["sample"] and (smoke["shards_planned"], smoke["shards_total"]) == (2, 7)
    assert sorted((Path(i["prefix"]).name, i["first"]) for i in smoke["inputs"]) == [("cat", "000.png"), ("cat", "002.png")]


def test_a_new_folder_adds_shards_and_a_same_size_rewrite_is_read_again_on_resume(tmp_path, model):
    """A first run stages its shards and publishes nothing (a non-image file over a zero
    dead-letter limit). Then a folder is added (a daily folder) and one image rewritten in
    place with the same size; the same command with the limit raised resumes the same run:
    the untouched shards are taken from staging, the new folder's and the rewritten one's
    are extracted, and every row equals Keras predict on the files as they are now."""
    from layerbeam.config import load_config
    from layerbeam.run import run_job
    from layerbeam.transforms.errors import OutcomeError
    from layerbeam.transforms.staging import OutputLayout

    data = tmp_path / "data"
    images = _tree(data, {"2026-11-01": 4, "2026-11-02": 3}, fmt=_bmp, ext="bmp")
    (data / "2026-11-02" / "zz-notes.txt").write_text("not an image\n")
    raw = _config(data, tmp_path / "out", model, **{"input.files_per_shard": 2, "output.max_dead_letter_fraction": 0.0})
    with pytest.raises(OutcomeError):
        run_job(load_config(raw=raw))
    (run_dir,) = [p for p in (tmp_path / "out.layerbeam-staging").iterdir() if p.is_dir()]
    info = json.loads((run_dir / OutputLayout.RUN_INFO).read_text())
    assert "shards" not in info and info["listing"]["prefixes"] == 3 and info["listing"]["exact"]  # data itself + 2 folders
    first = {p.name for p in (run_dir / "shards").glob("*.done.json")}
    assert len(first) == 4  # [0 1] [2 3] | [0 1] [2 zz-notes.txt]

    images.update(_tree(data, {"2026-11-03": 3}, seed=5, fmt=_bmp, ext="bmp"))
    target = data / "2026-11-01" / "002.bmp"
    new = photo_crops(1, SIZE, seed=42)[0]
    before = target.stat().st_size
    target.write_bytes(_bmp(new))
    assert target.stat().st_size == before
    images[str(target)] = new
    raw["output"]["max_dead_letter_fraction"] = 1.0  # not part of the run id: the same run resumes
    manifest = run_job(load_config(raw=raw))
    assert manifest["run_id"] == run_dir.name
    assert manifest["_metrics"]["shards_resumed"] == 3  # all but the rewritten image's shard
    assert manifest["_metrics"]["shards"] == 6  # 4 before + 2 of the new folder
    assert manifest["counts"]["dead_letter_reasons"] == {"not_an_image": 1}
    _check_rows(tmp_path / "out", model, images)


def test_a_shard_whose_folder_changed_since_its_listing_is_refused_in_one_line(tmp_path):
    from layerbeam.transforms.readers import match_shards, shard_identity
    from layerbeam.transforms.readers.folders import InputChangedError, resolve

    data = tmp_path / "data"
    _tree(data, {"a": 4, "b": 2}, fmt=_bmp, ext="bmp")
    pattern = str(data / "*" / "*.bmp")
    shards = match_shards(pattern, "images", 2)
    assert [s.span[1:] for s in shards] == [("000.bmp", "001.bmp", 2), ("002.bmp", "003.bmp", 2), ("000.bmp", "001.bmp", 2)]
    assert resolve(shards[0], pattern).paths == (str(data / "a/000.bmp"), str(data / "a/001.bmp"))
    (data / "a" / "002x.bmp").write_bytes(b"BM")  # sorts inside the second shard's span
    with pytest.raises(InputChangedError, match=r"^the images of shard i[0-9a-f]{16}-00001 \(.*/a/002.bmp … 003.bmp\) changed since the run listed them \(3 files now, 2 when listed\); re-run"):
        resolve(shards[1], pattern)
    os.unlink(data / "a" / "002x.bmp")
    old = (data / "b" / "001.bmp").read_bytes()
    (data / "b" / "001.bmp").write_bytes(old[::-1])  # same size, other bytes
    with pytest.raises(InputChangedError, match=r"a file was rewritten"):
        resolve(shards[2], pattern)
    # a folder added elsewhere leaves every shard as it was: same ids, spans and versions
    _tree(data, {"c": 3}, fmt=_bmp, ext="bmp")
    again = match_shards(pattern, "images", 2)
    assert {shard_identity(s) for s in shards[:2]} <= {shard_identity(s) for s in again}
    assert [s.id for s in again[:2]] == [s.id for s in shards[:2]] and len(again) == 5


def test_the_launcher_holds_no_per_image_list(tmp_path, model):
    """The plan (what the launcher holds and ships), `_run.json`'s input part and one
    shard's description are the same size for 2 or 200 images per folder."""
    from layerbeam.config import load_config
    from layerbeam.plan import prepare
    from layerbeam.transforms.readers import match_shards

    sizes = []
    for n in (2, 200):
        data = tmp_path / f"d{n}"
        for label in ("cat", "dog"):
            (data / label).mkdir(parents=True)
            for i in range(n):
                (data / label / f"{i:05d}.png").write_bytes(b"x")
        plan = prepare(load_config(raw=_config(data, tmp_path / f"out{n}", model, **{"input.files_per_shard": 1000})))
        assert plan.estimated_examples == 2 * n and plan.shards == 2 and plan.inputs == ()
        light = pickle.dumps(dataclasses_replace(plan, config=None, spec=None, launcher_model=None))
        shard = pickle.dumps(match_shards(str(data), "images", 1000)[0])
        sizes.append((len(light), len(json.dumps(plan.listing)), len(shard)))
    (p2, r2, s2), (p200, r200, s200) = sizes
    assert abs(p200 - p2) <= 8 and r200 == r2 and s200 - s2 <= 4, sizes  # digits of the counts only


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_the_launcher_lists_a_bounded_sample_of_many_folders(tmp_path):
    from layerbeam.transforms.readers.folders import survey

    for k in range(100):
        d = tmp_path / "data" / f"f{k:03d}"
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(b"xx")
    s = survey(str(tmp_path / "data"), 2, max_prefixes=8)
    assert len(s.prefixes) == 101 and s.listed == 8 and not s.complete  # data itself + 100 subtrees
    assert 250 <= s.files <= 350 and 150 <= s.shards <= 250  # scaled from the sample (exact: 300, 200)
    full = survey(str(tmp_path / "data"), 2, max_prefixes=1000)
    assert full.complete and (full.files, full.shards, full.bytes) == (300, 200, 600)


@pytest.mark.parametrize("subtrees", [1, 64])
def test_match_shards_in_the_pipeline_lists_per_prefix_and_keeps_the_first_shards(tmp_path, monkeypatch, subtrees):
    """Whether the plan walks whole subtrees (few top folders) or lists each folder on its
    own, the pipeline's listing cuts the same shards; `max_shards` keeps the first ones."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from layerbeam.transforms.beam import MatchShards
    from layerbeam.transforms.readers import folders, match_shards

    _tree(tmp_path / "data", {"a": 3, "b": 2, "c": 1, "a/deep": 2}, fmt=lambda im: b"x")
    pattern = str(tmp_path / "data")
    every = match_shards(pattern, "images", 2)
    assert [(os.path.relpath(s.span[0], pattern), s.span[3]) for s in every] == [("a", 2), ("a", 1), ("a/deep", 2), ("b", 2), ("c", 1)]
    monkeypatch.setattr(folders, "MIN_SUBTREES", subtrees)
    walked = {p.recursive for p in folders.plan_prefixes(pattern)}
    assert walked == ({True} if subtrees == 1 else {False})  # one walk of the whole tree, or each folder alone
    for cap, want in ((None, every), (3, every[:3])):
        with beam.Pipeline() as p:
            got = p | MatchShards(pattern, "images", 2, cap)
            assert_that(got, equal_to(want))


from tests.objectstores import gcs_server, gcs_store, local_store, s3_server, s3_store, store  # noqa: E402,F401


def test_folders_on_each_store_list_as_glob_does_and_a_rewrite_is_caught(store):
    """Local, S3 (moto) and GCS (fake-gcs-server): the per-folder listing resolves to exactly
    the files fsspec's own glob finds, keeps no listing in the client's cache, and a
    same-size rewrite (new ETag / generation) is refused."""
    from layerbeam.transforms.readers import match_shards
    from layerbeam.transforms.readers.folders import InputChangedError, resolve

    fs = store.fs
    for name in ("cat/a.png", "cat/b.png", "cat/c.png", "dog/d.png", "dog/old/e.png", "top.png"):
        if store.name == "local":
            os.makedirs(os.path.dirname(f"{store.path}/{name}"), exist_ok=True)
        fs.pipe_file(f"{store.path}/{name}", name.encode())
    fs.invalidate_cache()
    shards = match_shards(store.url, "images", 2)
    got = sorted(p for s in shards for p in resolve(s, store.url).paths)
    assert not dict(getattr(fs, "dircache", {}))  # no folder's listing was kept by the client
    want = sorted(p if store.name == "local" else fs.unstrip_protocol(p) for p, i in fs.glob(f"{store.path}/**", detail=True).items() if i["type"] != "directory")
    assert got == want and len(got) == 6
    assert [s.span[3] for s in shards if s.span[0].endswith("/cat")] == [2, 1]
    cat = next(s for s in shards if s.span[0].endswith("/cat") and s.span[3] == 2)
    fs.pipe_file(f"{store.path}/cat/b.png", b"cat/B.png")  # same size, other bytes
    if store.name == "local":
        os.utime(f"{store.path}/cat/b.png", ns=(1, 1))  # mtime (and size) are what a local listing sees
    with pytest.raises(InputChangedError, match="a file was rewritten"):
        resolve(cat, store.url)


def test_an_output_inside_an_image_folder_is_refused_before_work(tmp_path, model):
    from layerbeam.config import ConfigError, load_config
    from layerbeam.plan import prepare

    _tree(tmp_path / "data", {"cat": 1, "dog": 1}, fmt=lambda im: b"x")
    for out in (tmp_path / "data", tmp_path / "data" / "cat", tmp_path / "data" / "dog" / "out"):
        with pytest.raises(ConfigError, match=r"choose an output.path outside the input"):
            prepare(load_config(raw=_config(tmp_path / "data", out, model)))
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == ["000.png", "000.png", "cat", "dog"]


def test_an_image_rewritten_between_the_listing_and_its_read_fails_the_run_in_one_line(tmp_path, model, monkeypatch):
    """The pipeline lists the folders, then (before any shard is read) an image is rewritten
    in place with the same size: its shard's worker refuses it (one line, a `ConfigError`,
    which the CLI prints as one `layerbeam: error:` line) and nothing is published."""
    from layerbeam.config import ConfigError, load_config
    from layerbeam.run import run_job
    from layerbeam.transforms.readers import folders

    data = tmp_path / "data"
    _tree(data, {"cat": 2}, fmt=_bmp, ext="bmp")
    listed = folders.list_prefix

    def list_then_rewrite(pattern, prefix, files_per_shard):
        shards = list(listed(pattern, prefix, files_per_shard))
        target = data / "cat" / "001.bmp"
        if shards and target.exists():
            target.write_bytes(_bmp(photo_crops(1, SIZE, seed=77)[0]))
        return shards

    monkeypatch.setattr(folders, "list_prefix", list_then_rewrite)
    with pytest.raises(ConfigError) as e:
        run_job(load_config(raw=_config(data, tmp_path / "out", model)))
    line = str(e.value).splitlines()[0]
    assert line.startswith("the images of shard i") and "cat/000.bmp … 001.bmp) changed since the run listed them (a file was rewritten" in line, line
    assert not (tmp_path / "out").exists()


def _keyed(out: Path) -> dict:
    """key → (label, conv1) of an output, read with layerbeam.read."""
    import layerbeam

    t = layerbeam.read(str(out))
    conv = t.column("conv1").combine_chunks().to_numpy_ndarray()
    return {k: (lab, conv[i]) for i, (k, lab) in enumerate(zip(t.column("key").to_pylist(), t.column("label").to_pylist()))}


def test_images_builds_are_incremental_a_new_day_folder_and_a_same_size_rewrite_extract_only_their_shards(tmp_path, model, capsys):
    """Issue 15 for `images` (listed only in the pipeline, matched there against the latest
    version): day folders 1 and 2 give version 1; a third day folder gives version 2, which
    extracts only that folder's shards (Beam's own `shards`/`examples` metrics); an image
    rewritten in place with the same size gives version 3, which extracts only its shard.
    Each version equals a from-scratch build key by key (and Keras predict). A run with
    nothing new commits nothing: `up to date at version 3`, exit 0, no version added,
    nothing left in staging."""
    import layerbeam
    from layerbeam.cli import _console, _print_plan
    from layerbeam.config import load_config
    from layerbeam.plan import human, prepare
    from layerbeam.transforms.versions import list_versions, manifest_version

    data, out = tmp_path / "data", tmp_path / "out"
    images = _tree(data, {"day1": 3, "day2": 2}, fmt=_bmp, ext="bmp")  # 2 per shard: day1 [0 1] [2], day2 [0 1]
    cfg = _config(data, out, model, **{"input.files_per_shard": 2})

    def step(n: int, shards: int, examples: int, **delta):
        if n > 1:  # the size plan cannot count them before the pipeline lists: it says so
            _print_plan(_console(), prepare(load_config(raw=cfg), plan_only=True), human)
        m = layerbeam.run(cfg)
        met, d = m["_metrics"], m.get("delta") or {}
        print(f"version {m['version']} (parent {m['parent']}) · delta {d} · extracted {met.get('shards', 0)} shards, {met.get('examples', 0)} examples · {m['counts']['rows_written']} rows")
        assert manifest_version(m) == n and m["parent"] == (n - 1 if n > 1 else None)
        assert (met.get("shards", 0), met.get("examples", 0)) == (shards, examples)
        for k, v in delta.items():
            assert d[k] == v, (k, d)
        scratch = tmp_path / f"scratch{n}"
        layerbeam.run(_config(data, scratch, model, **{"input.files_per_shard": 2}))
        mine, ref = _keyed(out), _keyed(scratch)
        assert sorted(mine) == sorted(ref) == sorted(images)
        for k in mine:
            assert mine[k][0] == ref[k][0] == Path(k).parent.name
            np.testing.assert_allclose(mine[k][1], ref[k][1], rtol=1e-6, atol=1e-6, err_msg=k)
        _check_rows(out, model, images)
        return m

    step(1, 3, 5)
    images.update(_tree(data, {"day3": 3}, seed=7, fmt=_bmp, ext="bmp"))  # the next day's folder: [0 1] [2]
    step(2, 2, 3, new=2, changed=0, reused=3, removed=0)
    p = data / "day2" / "001.bmp"
    new = photo_crops(1, SIZE, seed=42)[0]
    size = p.stat().st_size
    p.write_bytes(_bmp(new))  # rewritten in place, the same size: only day2's shard is read again
    assert p.stat().st_size == size
    images[str(p)] = new
    m3 = step(3, 1, 2, new=0, changed=1, reused=4, removed=0)
    assert sorted((Path(i["prefix"]).name, i["first"], i["reused"]) for i in m3["inputs"]) == [
        ("day1", "000.bmp", True), ("day1", "002.bmp", True), ("day2", "000.bmp", False), ("day3", "000.bmp", True), ("day3", "002.bmp", True)]
    plan_text = capsys.readouterr().out
    with capsys.disabled():
        print(plan_text)
    assert "images: new, changed and reused shards decided while listing, in the pipeline" in plan_text
    # nothing new: the CLI's run lists in the pipeline, finds nothing to extract, writes no version
    before = {q: (q.stat().st_size, q.stat().st_mtime_ns) for q in out.rglob("*")}
    y = tmp_path / "job.yaml"
    y.write_text(yaml.safe_dump(cfg))
    r = run_cli(["run", str(y), "-q"])
    assert r.returncode == 0 and "up to date at version 3" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    assert [manifest_version(v) for v in list_versions(str(out))] == [1, 2, 3]
    assert {q: (q.stat().st_size, q.stat().st_mtime_ns) for q in out.rglob("*")} == before
    assert not Path(f"{out}.layerbeam-staging").exists()
    # a day folder deleted: version 4 extracts nothing and drops its shards
    import shutil

    shutil.rmtree(data / "day3")
    images = {k: v for k, v in images.items() if Path(k).parent.name != "day3"}
    m4 = step(4, 0, 0, new=0, changed=0, reused=3, removed=2)
    from layerbeam.cli import _print_summary

    capsys.readouterr()
    _print_summary(_console(), m4, human, quiet=True)
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "· version 4 from 3: 0 new, 0 changed, 3 reused, 2 removed shards" in summary, summary
    with capsys.disabled():
        print(summary)
    r = run_cli(["history", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    with capsys.disabled():
        print(r.stdout)
