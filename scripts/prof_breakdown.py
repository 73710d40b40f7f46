"""Where a `layerbeam run` spends its wall time, from a py-spy raw profile.

    py-spy record --idle --threads --rate 50 --nonblocking -f raw -o prof.txt -- layerbeam run cfg.yaml -q
    python scripts/prof_breakdown.py prof.txt --rate 50

Each sample (with --idle, waiting counts too) is put in the first bucket whose pattern
appears in its stack (the per-batch buckets come first, so inner work wins over the frames
around it), and counts become seconds with the sampling rate; the busiest threads are
broken down one by one (on the in-process FnApiRunner the shards run on a bundle thread,
not the main thread).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

# (bucket, regex on the whole stack); first match wins, so order matters: inner before outer.
BUCKETS = [
    ("shard: dedupe keys (_drop_repeated_keys, key_hashes)", r"_drop_repeated_keys|key_hashes"),
    ("shard: model call (Extractor.__call__)", r"Extractor\.__call__"),
    ("shard: Arrow conversion (to_record_batch)", r"to_record_batch"),
    ("shard: wait for tf.data (read_shard next)", r"read_shard"),
    ("shard: writer (write_shard, parquet)", r"write_shard|parquet"),
    ("worker set-up: ShardProcessor.__init__ (model, trace, extractor)", r"ShardProcessor\.__init__"),
    ("shard: other (markers, keys, dead letters)", r"ShardProcessor\.process"),
    ("commit", r"commit"),
    ("prepare (load model, trace, plan)", r"prepare"),
    ("imports", r"_find_and_load"),
    ("pipeline: Beam runner, waiting for bundles", r"run_job|wait_until_finish|fn_api_runner|worker_handlers|sdk_worker"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=3, help="break down this many of the busiest threads")
    ap.add_argument("--top", type=int, default=0, help="also print the N heaviest leaf frames of the busiest thread")
    args = ap.parse_args(argv)
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open(args.raw):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        for name, pat in BUCKETS:
            if re.search(pat, stack):
                per_thread[thread][name] += int(count)
                break
        else:
            per_thread[thread]["(unmatched)"] += int(count)
        leaves[thread][frames[-1]] += int(count)
    ranked = sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values()))
    main_thread = ranked[0][0]
    for thread, buckets in ranked[: args.threads]:
        total = sum(buckets.values())
        print(f"thread {thread} · {total / args.rate:.1f}s sampled")
        for name, _ in [*BUCKETS, ("(unmatched)", "")]:
            if buckets.get(name):
                print(f"  {name:<66} {buckets[name] / args.rate:7.1f}s  {100 * buckets[name] / total:5.1f}%")
    if args.top:
        print("heaviest leaf frames of the busiest thread:")
        for f, c in leaves[main_thread].most_common(args.top):
            print(f"  {c / args.rate:7.1f}s  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
