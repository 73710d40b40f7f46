"""DecodeImages' decode-ahead, measured where it matters: feeding a step that waits without
using the CPU, as a model on a GPU does (here a sleep of 0.25 s per batch of 32).

Run it with two checkouts' interpreters, alternating, to compare (the decode-ahead came
with commit "DecodeImages decodes one batch ahead"):

    python scripts/bench_decode_ahead.py NAME          # prints: RESULT NAME <seconds>

On 2 CPU cores (2026-11-28): 17.7, 17.8 s with the decode ahead against 19.7, 20.0 s
without (the sleeps alone: 16.0 s). With a CPU model (scripts/bench.py's extract_layers)
decoding and the model share the same cores, and the decode-ahead measured no gain."""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import apache_beam as beam  # noqa: E402
import tensorflow as tf  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402

import layerbeam  # noqa: E402

N = 2048
DATA = Path(__file__).resolve().parents[1] / "data" / f"bench-{N}-8"  # made by `scripts/bench.py --n 2048`
WAIT_S = 0.25  # per batch of 32: a GPU's MobileNetV2 batch seen from the CPU is a wait, not work


def key_and_bytes(record: bytes):
    f = tf.train.Example.FromString(record).features.feature
    return f["image/key"].bytes_list.value[0].decode(), f["image/encoded"].bytes_list.value[0]


def main() -> None:
    t = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (
            p
            | beam.io.ReadFromTFRecord(f"{DATA}/*.tfrecord")
            | beam.Map(key_and_bytes)
            | layerbeam.DecodeImages((224, 224), "keras.applications.MobileNetV2")
            | beam.BatchElements(min_batch_size=32, max_batch_size=32)
            | beam.Map(lambda b: time.sleep(WAIT_S) or len(b))
            | beam.combiners.Count.Globally()
        )
    name = sys.argv[1] if len(sys.argv) > 1 else "this"
    print(f"RESULT {name} {time.perf_counter() - t:.2f}s (the waits alone: {N / 32 * WAIT_S:.1f}s)")


if __name__ == "__main__":
    main()
