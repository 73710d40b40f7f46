"""The CLI a user can trust on a long run (issue 16), through the real entry point in a
subprocess: exit codes, one-line errors, safe overwrite, smoke runs, conventions,
progress, verify, statistics and plots. Each "Why" bullet of the issue is a test here.

Exit codes: 0 published (or check passed), 1 the run did its work but published nothing
(or verify found values off), 2 a user error before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import encode_png, example, photo_crops, read_manifest, run_cli, write_tfrecords
from tests.tiny import save_tiny_model, tiny_config

_NATIVE = re.compile(r"[IWEF]\d{4} |WARNING: All log messages before absl|oneDNN|cuda|Traceback")


def _errors(r, code: int = 2) -> list[str]:
    """The `layerbeam: error:` lines of a run that must end with them (no traceback, no
    TensorFlow lines), after checking its exit code."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert not _NATIVE.search(r.stderr), r.stderr[-3000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("layerbeam: error:")]
    assert lines, r.stderr[-2000:]
    return lines


def _one_line(r, code: int = 2) -> str:
    lines = _errors(r, code)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny model, 10 photo crops of 32 px in 3 TFRecord shards, a config writer and one
    committed output (conv1 mean float32 + conv2 unreduced float16), written with -q."""
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "tiny.keras")
    imgs = photo_crops(10, 32, seed=3)
    recs = [example({"image/encoded": encode_png(im), "image/key": f"k{i:03d}", "image/class/label": i % 3}) for i, im in enumerate(imgs)]
    write_tfrecords(root / "data", [recs[:4], recs[4:7], recs[7:]])
    select = ["conv1", {"layer": "conv2", "as": "c2", "reduce": "none", "dtype": "float16"}]

    def cfg(out: Path | str, name: str = "job.yaml", **overrides) -> Path:
        raw = tiny_config(str(root / "data/*.tfrecord"), str(out), model, **{"layers.select": select, **overrides})
        p = Path(out).parent / name if Path(out).parent.exists() else root / name
        p.write_text(yaml.safe_dump(raw))
        return p

    out = root / "good"
    r = run_cli(["run", str(cfg(out, "good.yaml")), "-q"])
    return root, model, cfg, out, r


# ---------------------------------------------------------------- silent total loss, exit codes


def test_quiet_run_prints_only_the_summary_with_shard_errors_and_no_noise(job):
    *_, out, r = job
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [r.stdout.strip()], r.stdout  # one line
    assert re.match(r"done · 10 rows, 0 dead letters, 0 shard errors, from 10 records · 3 files", r.stdout)
    assert not _NATIVE.search(r.stderr), r.stderr  # no TensorFlow or Beam lines, no oneDNN notice for float16
    assert (out / "_SUCCESS").exists()


def test_every_record_a_dead_letter_fails_without_success_and_names_the_reason(job, tmp_path):
    root, model, cfg, *_ = job
    out = tmp_path / "out"
    r = run_cli(["run", str(cfg(out, **{"input.image_feature": "image/encodd"}))])
    line = _errors(r, 1)[0]
    assert "the run wrote no rows: all 10 records became dead letters" in line, line
    assert "missing_feature" in r.stderr and "e.g. 'k000'" in r.stderr  # the top reason with one example
    assert not out.exists()


def test_too_many_dead_letters_fail_keep_their_shards_and_resume_with_a_higher_limit(job, tmp_path):
    root, model, cfg, *_ = job
    bad = [example({"image/encoded": b"not an image", "image/key": f"bad{i}", "image/class/label": 0}) for i in range(3)]
    good = [example({"image/encoded": encode_png(im), "image/key": f"g{i}", "image/class/label": 1}) for i, im in enumerate(photo_crops(9, 32))]
    paths = write_tfrecords(tmp_path / "data", [good[:4], good[4:7] + bad, good[7:]])
    paths[2].write_bytes(paths[2].read_bytes()[:-40])  # its last record loses its end: a shard error
    out = tmp_path / "out"
    c = cfg(out, **{"input.pattern": str(tmp_path / "data/*.tfrecord")})
    r = run_cli(["run", str(c)])
    line = _errors(r, 1)[0]
    assert "3 of 11 records (27.3%) became dead letters, over output.max_dead_letter_fraction = 0.1" in line, line
    assert "1 shard error, e.g. corrupt_shard in" in line and "--max-dead-letter-fraction 0.273 " in line, line
    assert re.search(r"^  \w+: e\.g\. 'bad0'", r.stderr, re.M), r.stderr
    assert not (out / "_SUCCESS").exists()
    (run_dir,) = [p for p in (tmp_path / "out.layerbeam-staging").iterdir() if p.is_dir()]
    assert len(list((run_dir / "shards").glob("*.done.json"))) == 3  # kept for the resumed run
    r = run_cli(["run", str(c), "-q", "--max-dead-letter-fraction", "0.273"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("done · 8 rows, 3 dead letters, 1 shard errors, from 11 records"), r.stdout  # shard errors in the summary
    assert re.search(r"^shard error in .*part-00002.tfrecord: corrupt_shard: .*\(1 records kept\)$", r.stdout, re.M), r.stdout
    m = read_manifest(out)
    assert m["run_id"] == run_dir.name and m["counts"]["dead_letters"] == 3  # the same run, resumed


def test_an_empty_committed_output_reads_as_an_empty_table_with_its_schema(job, tmp_path):
    """No run publishes one any more; one written by an older layerbeam (or a caller of
    `publish`) still reads: `show` and `layerbeam.read` give 0 rows, typed columns."""
    import layerbeam

    *_, out, _ = job
    empty = tmp_path / "empty"
    shutil.copytree(out, empty)
    for f in empty.rglob("*.parquet"):
        f.unlink()
    m = read_manifest(empty)
    m["files"], m["counts"]["rows_written"] = [], 0
    (empty / "_manifest.json").write_text(json.dumps(m))
    t = layerbeam.read(str(empty))
    assert len(t) == 0 and t.schema.names == ["key", "label", "conv1", "c2"]
    assert t.schema.field("c2").type.shape == [14, 14, 6]
    r = run_cli(["show", str(empty)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rows: 0" in r.stdout


# ---------------------------------------------------------------- safe overwrite


def test_overwrite_never_deletes_the_input_or_a_folder_layerbeam_did_not_write(job, tmp_path):
    root, model, cfg, *_ = job
    data = root / "data"
    before = sorted(p.name for p in data.iterdir())
    cases = {
        "the input folder": data,
        "a parent of the input": root,
        "inside an input glob": None,
    }
    for what, out in cases.items():
        if out is None:
            c = cfg(root / "x", f"{what}.yaml", **{"input.pattern": str(root / "**/*.parquet"), "output.path": str(root / "data/sub")})
        else:
            c = cfg(out, f"{what}.yaml")
        line = _one_line(run_cli(["run", str(c), "--overwrite"]))
        assert "input" in line and "choose an output.path outside the input" in line, (what, line)
    assert sorted(p.name for p in data.iterdir()) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for flags in ([], ["--overwrite"]):
        line = _one_line(run_cli(["run", str(cfg(foreign, "foreign.yaml")), *flags]))
        assert "layerbeam did not write" in line and "--overwrite" not in line, line
    assert (foreign / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------- smoke runs and plans


def test_plan_only_never_refuses_and_a_sample_says_so_and_never_replaces_a_full_output(job, tmp_path):
    import layerbeam
    from layerbeam.transforms.readback import SampleWarning

    root, model, cfg, out, _ = job
    r = run_cli(["run", str(cfg(out, "plan.yaml")), "--plan-only"])
    assert r.returncode == 0 and "nothing new, changed or removed since version 1: up to date" in r.stdout, (r.stdout, r.stderr[-2000:])
    r = run_cli(["run", str(cfg(out, "plan.yaml")), "--plan-only", "--set", "layers.reduce=max"])
    assert r.returncode == 0 and "a run would refuse: output" in r.stdout and "extracted differently (differs in layers.reduce" in r.stdout, (r.stdout, r.stderr[-2000:])
    line = _one_line(run_cli(["run", str(cfg(out, "smoke.yaml")), "--max-shards", "1", "--overwrite"]))
    assert "smoke run" in line and "never replaces" in line
    sample = tmp_path / "sample"
    r = _in_a_terminal(["run", str(cfg(sample, "sample.yaml")), "--max-shards", "1", "--max-examples-per-shard", "2"])
    assert "done · 2 rows" in r and "SAMPLE" in r, r
    # the progress display, on a terminal: shards and examples of the planned totals
    assert re.search(r"shards 1/1 · examples 2/~\d+ · [\d.]+ examples/s · dead letters 0", r), r
    m = read_manifest(sample)
    assert m["sample"] is True and m["shards_planned"] == 1 and m["shards_total"] == 3
    r = run_cli(["show", str(sample), "--rows", "0"])
    assert "SAMPLE: a smoke run, not the whole input (1 of 3 shards, at most 2 examples per shard)" in r.stdout, r.stdout
    with pytest.warns(SampleWarning, match="is a sample"):
        layerbeam.read(str(sample))


def _in_a_terminal(args: list[str]) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal; return what it showed."""
    import pty

    env = dict(os.environ, COLUMNS="200")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    main, sub = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", "import sys; from layerbeam.cli import main; sys.exit(main())", *args],
                         stdout=sub, stderr=sub, stdin=subprocess.DEVNULL, env=env)
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=300)
    os.close(main)
    assert p.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))


def test_progress_is_off_when_not_a_terminal(job):
    *_, r = job
    assert "examples/s · dead letters" not in r.stderr + r.stdout.splitlines()[0].split("·", 1)[0]


# ---------------------------------------------------------------- malformed configs, one table


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# (what, --set overrides or extra CLI args, expected words in the one line). Documented
# acceptances are in test_documented_acceptances below.
MALFORMED = [
    ("negative image_size", ["--set", "input.image_size=[-32,32]"], "input.image_size.0 = -32 is invalid"),
    ("key_feature == label_feature", ["--set", "input.key_feature=image/class/label"], "input.key_feature and input.label_feature are both"),
    ("partition_by with '/'", ["--set", "input.passthrough={image/format: string}", "--set", "output.partition_by=[image/format]"], "contains '/'"),
    ("label and passthrough clash", ["--set", "input.passthrough={image/class/label: string}"], "is also in input.passthrough as string"),
    ("dead-letter fraction over 1", ["--set", "output.max_dead_letter_fraction=2"], "output.max_dead_letter_fraction = 2 is invalid"),
    ("unknown runner", ["--runner=NopeRunner"], "--runner=NopeRunner is not a Beam runner"),
    ("misspelled Beam flag", ["--runer=DataflowRunner"], "unknown flag '--runer'"),
    ("misspelled layerbeam flag", ["--max-shard", "1"], "did you mean --max-shards"),
    ("wrong input.compression", ["--set", "input.compression=GZIP"], "input.compression is 'GZIP' but"),
    ("image_size the model cannot take", ["--set", "model.source={flat}", "--set", "input.image_size=[64,64]", "--set", "layers.select=[conv1]"], "does not fit the model"),
    ("unreachable gs:// path", ["--set", "input.pattern=gs://layerbeam-no-such-bucket/*.tfrecord"], "cannot be listed"),
]


@pytest.fixture(scope="module")
def flat_model(job):
    import keras

    root = job[0]
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(2, 3, name="conv1")(inp)
    x = keras.layers.Dense(3, name="dense")(keras.layers.Flatten()(x))
    keras.Model(inp, x).save(root / "flat.keras")
    return root / "flat.keras"


@pytest.mark.parametrize("what,args,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_configs_are_one_line_exit_2_errors(job, flat_model, tmp_path, monkeypatch, what, args, expected):
    root, model, cfg, *_ = job
    if what == "unreachable gs:// path":  # a GCS endpoint that refuses connections (no network needed)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    args = [a.replace("{flat}", str(flat_model)) for a in args]
    r = run_cli(["run", str(cfg(tmp_path / "out")), "--plan-only", *args])
    line = _one_line(r)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_every_config_error_is_reported_at_once(job, tmp_path):
    root, model, cfg, *_ = job
    r = run_cli(["run", str(cfg(tmp_path / "out")), "--set", "batching.batch_size=0", "--set", "output.compression=lz5", "--set", "input.channels=9"])
    lines = _errors(r)
    assert len(lines) == 3 and all(k in r.stderr for k in ("batching.batch_size", "output.compression", "input.channels")), lines


def test_documented_acceptances(job, tmp_path):
    """A label feature that is also a passthrough of the same type is accepted (both
    columns hold it); an image_size a resizing model can take is accepted."""
    root, model, cfg, *_ = job
    r = run_cli(["run", str(cfg(tmp_path / "out")), "--plan-only", "-q", "--set", "input.passthrough={image/class/label: int64}", "--set", "input.image_size=[48,48]"])
    assert r.returncode == 0, r.stderr[-2000:]


def test_disk_full_during_a_run_is_one_line_exit_1(job, tmp_path):
    root, model, cfg, *_ = job
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        c = cfg(mnt / "out", **{"layers.select": [{"layer": "conv1", "reduce": "none"}], "output.compression": "none"})
        shutil.move(str(c), tmp_path / "job.yaml")
        line = _one_line(run_cli(["run", str(tmp_path / "job.yaml")]), 1)
        assert "no space left on the device" in line and "run the same command again to resume" in line, line
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------- conventions


def test_version_and_log_level():
    from importlib import metadata

    r = run_cli(["--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"layerbeam {metadata.version('layerbeam')}"
    r = run_cli(["show", "/nonexistent", "--log-level", "LOUD"])
    assert "invalid choice: 'LOUD'" in _one_line(r)


def test_layers_table_does_not_wrap_when_piped(tmp_path):
    """`layerbeam layers model.keras | grep <long path>` finds it: no cell is wrapped."""
    import keras

    inner_in = keras.Input((32, 32, 3))
    y = keras.layers.Conv2D(2, 3, name="block_13_expand_relu_with_a_really_quite_long_name_indeed")(inner_in)
    inner = keras.Model(inner_in, y, name="a_backbone_with_a_long_name_too")
    inp = keras.Input((32, 32, 3), name="image")
    keras.Model(inp, inner(inp)).save(tmp_path / "nested.keras")
    r = run_cli(["layers", str(tmp_path / "nested.keras")])
    assert r.returncode == 0, r.stderr[-2000:]
    hits = [l for l in r.stdout.splitlines() if "a_backbone_with_a_long_name_too/block_13_expand_relu_with_a_really_quite_long_name_indeed" in l]
    assert len(hits) == 1 and "Conv2D" in hits[0], r.stdout


# ---------------------------------------------------------------- verify, statistics, plots


def test_verify_passes_on_a_good_output_and_fails_on_one_tampered_value(job, tmp_path):
    *_, out, _ = job
    r = run_cli(["verify", str(out), "--sample", "100"])
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert "10 random rows recomputed with plain Keras" in r.stdout and "ok: every output" in r.stdout
    bad = tmp_path / "tampered"
    shutil.copytree(out, bad)
    f = sorted(bad.rglob("part-*.parquet"))[0]
    import pyarrow as pa

    t = pq.read_table(f)
    i = t.schema.get_field_index("conv1")
    col = values = t.column("conv1").combine_chunks()
    sizes = []
    while pa.types.is_fixed_size_list(values.type):  # the stored encoding: nested fixed-size lists
        sizes.append(values.type.list_size)
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False).copy()
    flat[2] += 0.5  # one value of the first row
    tampered = pa.array(flat, type=values.type)
    for size in reversed(sizes):
        tampered = pa.FixedSizeListArray.from_arrays(tampered, size)
    t = t.set_column(i, t.schema.field(i), tampered.cast(col.type))
    pq.write_table(t, f)
    r = run_cli(["verify", str(bad), "--sample", "100"])
    line = _one_line(r, 1)
    assert "conv1 (max abs error 0.5" in line, line


def test_statistics_equal_numpy_over_the_read_back_table(job):
    import layerbeam

    *_, out, _ = job
    m = read_manifest(out)
    t = layerbeam.read(str(out))
    for name in ("conv1", "c2"):
        v = t.column(name).combine_chunks().to_numpy_ndarray().astype(np.float64).ravel()
        s = m["statistics"][name]
        assert s["count"] == v.size and s["nan"] == 0 and s["inf"] == 0
        np.testing.assert_allclose([s["mean"], s["std"], s["min"], s["max"]], [v.mean(), v.std(), v.min(), v.max()], rtol=1e-9, atol=1e-12)
        assert s["zero_fraction"] == pytest.approx((v == 0).mean())
    r = run_cli(["show", str(out), "--rows", "0"])
    assert re.search(r"conv1\s+│\s+40\s+│", r.stdout), r.stdout


def test_nan_and_inf_are_counted_and_flagged_in_the_summary(job, tmp_path):
    """A model that emits Inf (overflow) and NaN (Inf - Inf) is flagged in the summary."""
    import keras

    root, model, cfg, *_ = job
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(2, 3, name="conv1")(inp)
    big = keras.layers.Rescaling(1e30, name="big")(keras.layers.Rescaling(1e30)(x))  # |x| > 3e-22 overflows to ±Inf
    nan = keras.layers.Subtract(name="nan")([big, big])  # Inf - Inf = NaN, the rest 0
    keras.Model(inp, [big, nan]).save(tmp_path / "nan.keras")
    out = tmp_path / "out"
    select = [{"layer": "big", "reduce": "none"}, {"layer": "nan", "reduce": "none"}]
    r = run_cli(["run", str(cfg(out, **{"model.source": str(tmp_path / "nan.keras"), "layers.select": select})), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"warning: output 'big' holds [\d,]+ NaN and [1-9][\d,]* Inf values", r.stdout), r.stdout
    assert re.search(r"warning: output 'nan' holds [1-9][\d,]* NaN and [\d,]+ Inf values", r.stdout), r.stdout
    import layerbeam

    t = layerbeam.read(str(out))
    stats = read_manifest(out)["statistics"]
    for name in ("big", "nan"):
        v = t.column(name).combine_chunks().to_numpy_ndarray().ravel()
        s = stats[name]
        assert s["nan"] == np.isnan(v).sum() and s["inf"] == np.isinf(v).sum() and s["nan"] + s["inf"] > 0
        finite = v[np.isfinite(v)].astype(np.float64)
        assert s["count"] == v.size and s["zero_fraction"] == pytest.approx((v == 0).mean())
        if finite.size:
            assert s["mean"] == pytest.approx(finite.mean()) and s["max"] == finite.max()


def test_show_plot_draws_one_panel_per_output(job, tmp_path):
    from PIL import Image

    *_, out, _ = job
    png = tmp_path / "hist.png"
    r = run_cli(["show", str(out), "--rows", "0", "--plot", str(png)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"plot: {png} (2 panels)" in r.stdout
    img = Image.open(png)
    img.verify()
    assert img.format == "PNG" and img.size[0] > img.size[1] > 200  # two panels side by side


def test_show_on_a_tfrecord_output_keeps_tensorflow_quiet(three_formats):
    out, _ = three_formats["tfrecord"]
    r = run_cli(["show", str(out), "--rows", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert not _NATIVE.search(r.stderr), r.stderr
    assert "first 2 rows" in r.stdout and "statistics" in r.stdout


def test_run_imports_with_the_collector_paused_and_frozen_after(job, tmp_path):
    """`layerbeam run` imports TensorFlow, Keras and Beam with Python's cyclic collector
    paused, then freezes what they built: without, the growing heap set off 7 full
    collections (0.9 s) during those imports alone. The collector is on again for the run,
    and also after an error inside the pause."""
    root, model, cfg, out, _ = job
    code = (
        "import gc, json, sys\n"
        "from layerbeam import cli\n"
        "try:\n"
        "    with cli._collector_paused():\n"
        "        raise KeyError('inside')\n"
        "except KeyError:\n"
        "    pass\n"
        "after_error = gc.isenabled()\n"
        "gc.unfreeze()\n"
        "full, at_prepare = [], []\n"
        "gc.callbacks.append(lambda what, info: full.append(1) if what == 'stop' and info['generation'] == 2 else None)\n"
        "import layerbeam.plan as plan\n"
        "prepare = plan.prepare\n"
        "plan.prepare = lambda *a, **k: (at_prepare.append(len(full)), prepare(*a, **k))[1]\n"
        "rc = cli.main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'after_error': after_error, 'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count(), 'full_before_prepare': at_prepare}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, "run", str(cfg(tmp_path / "gc-out", "gc.yaml")), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0 and got["after_error"] and got["enabled"], got
    assert got["frozen"] > 100_000, got  # TensorFlow's, Keras's and Beam's objects, never scanned again
    assert got["full_before_prepare"] == [0], got  # from the start to the model's load: 7 without the pause
    assert len(pq.read_table(tmp_path / "gc-out").column("key")) == 10
