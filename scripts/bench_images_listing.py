"""Bytes per image that an `images` input costs in each place the run keeps its input list
(issue 13 item 6), on a real local tree of empty files (no model, no TensorFlow).

    python scripts/bench_images_listing.py --dirs 100 --per-dir 1000          # this checkout
    /path/to/other/.venv/bin/python scripts/bench_images_listing.py ...       # another one

It measures, through the installed `layerbeam`'s own functions:

* launcher: the peak Python memory (tracemalloc) of the launcher's listing step (`prepare`'s:
  `match_shards` before, `folders.survey` after) and what it keeps (pickled);
* `_run.json`: the input part the launcher writes into the run's staging folder;
* shard descriptions: the pickled shards, which are the pipeline's `MatchShards` elements
  and the commit's side input (`CommitShards`' completeness check);
* results: each shard's `ShardResult` as Beam pickles it and as its marker JSON;
* manifest: the `inputs` entries `finalize` writes.

Each figure is printed per image (total / images). Where the installed version has no compact
form, the old one is built the way its code builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import time
import tracemalloc


def make_tree(root: str, dirs: int, per_dir: int) -> int:
    n = 0
    for d in range(dirs):
        folder = os.path.join(root, f"label{d:05d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_dir):
            p = os.path.join(folder, f"n{d:05d}_{i:08d}.JPEG")  # ImageNet-like names: 25 chars
            if not os.path.exists(p):
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/layerbeam-images-bench")
    ap.add_argument("--dirs", type=int, default=100)
    ap.add_argument("--per-dir", type=int, default=1000)
    ap.add_argument("--files-per-shard", type=int, default=512)
    a = ap.parse_args()

    from layerbeam.transforms.readers import match_shards
    from layerbeam.transforms.shard import ShardResult

    root = f"{a.root}/{a.dirs}x{a.per_dir}"
    n = make_tree(root, a.dirs, a.per_dir)
    try:
        from layerbeam.transforms.readers import folders
    except ImportError:
        folders = None
    version = "after (per-folder listing, compact shards)" if folders else "before (launcher listing, per-image paths)"

    # the launcher's listing step, as prepare() runs it
    tracemalloc.start()
    t0 = time.perf_counter()
    if folders:
        kept = folders.survey(root, a.files_per_shard)
        held = dict(kept.__dict__, first=None)
    else:
        kept = match_shards(root, "images", a.files_per_shard)
        held = kept
    launcher_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    launcher_kept = len(pickle.dumps(held))

    # the shards the pipeline lists (its elements and the commit's side input)
    t0 = time.perf_counter()
    shards = match_shards(root, "images", a.files_per_shard)
    listing_s = time.perf_counter() - t0
    side = len(pickle.dumps(shards))

    if folders:
        prefixes = kept.prefixes
        run_info = {"listing": {"prefixes": len(prefixes), "prefixes_listed": kept.listed, "exact": kept.complete, "prefixes_digest": "0" * 16}}
    else:
        run_info = {"shards": [{"shard": s.id, "paths": list(s.paths), "bytes": s.size} for s in shards]}
    run_json = len(json.dumps(run_info, sort_keys=True))

    names = {f.name for f in dataclasses.fields(ShardResult)}
    results = markers = manifest = 0
    for s in shards:
        span = getattr(s, "span", None)
        kw = dict(shard=s.id, paths=() if span else s.paths, bytes_in=s.size, read=s.span[3] if span else len(s.paths), rows=0, dead_letters=0,
                  dead_reasons={}, shard_errors=(), files=({"path": f"part-12345678-{s.id}.parquet", "final_path": f"part-12345678-{s.id}.parquet", "rows": 0, "bytes": 0},),
                  model_fingerprint="f" * 16, attempt="a" * 16, input_version=s.version, span=span)
        r = ShardResult(**{k: v for k, v in kw.items() if k in names})
        results += len(pickle.dumps(r))
        markers += len(json.dumps(r.to_dict()))
        summary = {"shard": s.id, "paths": list(r.paths), "span": list(span) if span else None, "version": s.version, "bytes_in": s.size,
                   "read": r.read, "rows": r.read, "dead_letters": 0, "timing": {"input_wait": 0.0, "model": 0.0, "to_arrow": 0.0, "write_and_other": 0.0}}
        try:
            from layerbeam.transforms.commit import _input_entry

            entry = _input_entry(summary)
        except ImportError:  # the old finalize's entry
            entry = {"shard": s.id, "paths": summary["paths"], "bytes": s.size, "records": r.read, "rows": r.read, "dead_letters": 0, "timing": summary["timing"]}
        manifest += len(json.dumps(entry, separators=(",", ":")))

    per = lambda b: f"{b / n:8.1f} B/image  ({b:,} B)"  # noqa: E731
    print(f"{version}: {n:,} images in {a.dirs:,} folders, {len(shards):,} shards of up to {a.files_per_shard}")
    print(f"  launcher listing, peak Python memory : {per(peak)}  in {launcher_s:.2f} s")
    print(f"  launcher listing, kept               : {per(launcher_kept)}")
    print(f"  _run.json input part                 : {per(run_json)}")
    print(f"  shard descriptions / side input      : {per(side)}  (pipeline listing {listing_s:.2f} s)")
    print(f"  results (pickled ShardResult)        : {per(results)}")
    print(f"  results (marker JSON)                : {per(markers)}")
    print(f"  manifest inputs                      : {per(manifest)}")


if __name__ == "__main__":
    main()
