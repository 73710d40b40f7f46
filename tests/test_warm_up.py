"""A worker's warm-up: the model's first trace and the first reader pipeline, done ahead of
the first shard (and, in the launcher's process, while Beam builds the pipeline)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq

from layerbeam.config import load_config
from layerbeam.plan import prepare
from tests.conftest import base_config


def _shard_rows(worker, result):
    files = [f"{worker.layout.shard_dir(result.shard, result.attempt)}/{f['path']}" for f in result.files]
    return pq.read_table(files[0], partitioning=None).sort_by("key").to_pylist()


def test_a_warmed_up_worker_writes_what_a_cold_one_writes_with_one_trace_and_one_pipeline(tmp_path, png_dataset):
    from layerbeam.transforms.readers import match_shards
    from layerbeam.transforms.shard import ShardProcessor

    folder, _, _ = png_dataset
    got = {}
    for warm in (False, True):
        job = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / f"out-{warm}")))
        plan = prepare(job)
        worker = ShardProcessor(plan.spec, plan.run_id, warm_up=warm)
        worker.wait_warm_up()
        (fn,) = [copy._fn for copy in worker.extractor._copies]
        # Warmed up: the model is traced and one reader pipeline is primed and idle.
        assert (fn.experimental_get_tracing_count(), len(worker.readers._idle)) == ((1, 1) if warm else (0, 0))
        primed = list(worker.readers._idle)
        shards = match_shards(job.input.pattern, "tfrecord")
        results = [worker.process(s) for s in shards]
        assert fn.experimental_get_tracing_count() == 1  # the first real batch did not trace again
        assert worker.readers._idle == primed or not warm  # the primed pipeline read the shards
        got[warm] = ([_shard_rows(worker, r) for r in results], [(r.read, r.rows, r.dead_letters) for r in results])
    assert got[True][1] == [(4, 4, 0), (3, 3, 0), (3, 3, 0)]
    assert got[True] == got[False]


def test_warm_up_leaves_a_model_that_changes_its_own_state_as_it_was():
    import keras

    from layerbeam.transforms.extractor import Extractor

    class Counter(keras.layers.Layer):
        """Adds how many times it was called (a non-trainable variable, as a stateful
        RNN's state or a random layer's seed is)."""

        def build(self, shape):
            self.count = self.add_weight(shape=(), initializer="zeros", trainable=False)

        def call(self, x):
            self.count.assign_add(1.0)
            return x + self.count

    def model():
        x = keras.Input((3,))
        return keras.Model(x, {"out": Counter()(x)})

    warm, cold = Extractor(model()), Extractor(model())
    warm.warm_up(2)
    assert warm._fn.experimental_get_tracing_count() == 1
    ones = {warm.input_names[0]: np.ones((2, 3), np.float32)}
    first = warm({warm.input_names[0]: ones[warm.input_names[0]]})["out"]
    np.testing.assert_array_equal(first, cold({cold.input_names[0]: ones[warm.input_names[0]]})["out"])
    np.testing.assert_array_equal(first, np.full((2, 3), 2.0))  # 1 + one call, as without the warm-up


def test_a_failed_warm_up_is_logged_and_the_first_shard_does_the_work(tmp_path, png_dataset, monkeypatch, caplog):
    from layerbeam.transforms.readers import ShardReaders, match_shards
    from layerbeam.transforms.shard import ShardProcessor

    def broken(self):
        raise OSError("no room for a pipeline")

    monkeypatch.setattr(ShardReaders, "warm_up", broken)
    folder, _, _ = png_dataset
    job = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out")))
    plan = prepare(job)
    worker = ShardProcessor(plan.spec, plan.run_id, warm_up=True)
    with caplog.at_level(logging.INFO, logger="layerbeam"):
        result = worker.process(match_shards(job.input.pattern, "tfrecord")[0])
    assert (result.read, result.rows) == (4, 4)
    assert "warm-up did not finish (OSError: no room for a pipeline)" in caplog.text


def test_the_launcher_builds_the_in_process_workers_processor_once_for_its_own_job(tmp_path, png_dataset, monkeypatch):
    import dataclasses

    import layerbeam.transforms.shard as shard
    from layerbeam.run import run_job

    folder, _, _ = png_dataset
    job = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out")))
    plan = prepare(job)
    with shard.offer_launcher_model(plan.run_id, plan.launcher_model, plan.spec):
        other = dataclasses.replace(plan.spec, layers=dataclasses.replace(plan.spec.layers, reduce="max"))
        assert shard.take_launcher_processor(plan.run_id, other) is None  # another job's worker builds its own
    with shard.offer_launcher_model(plan.run_id, plan.launcher_model, plan.spec):
        worker = shard.take_launcher_processor(plan.run_id, plan.spec)
        assert worker.reused_launcher_model and worker.cfg == plan.spec
        assert shard.take_launcher_processor(plan.run_id, plan.spec) is None  # taken once

    built = []
    real = shard.ShardProcessor.__init__

    def counted(self, spec, run_id, warm_up=False):
        built.append(warm_up)
        real(self, spec, run_id, warm_up)

    monkeypatch.setattr(shard.ShardProcessor, "__init__", counted)
    manifest = run_job(job, plan=prepare(job))
    assert built == [True]  # one processor, the launcher's, warmed up; the worker took it
    assert manifest["counts"]["rows_written"] == 10
    assert manifest["_metrics"]["launcher_model_reused"] == 1
