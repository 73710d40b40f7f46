"""Storage requests per data file of today's commit (`OutputLayout.assemble` + `publish`) on
real S3 (moto) and GCS (fake-gcs-server) servers: a synthetic staged run of N one-file
shards, no model. Not collected by `pytest tests/` (no `test_` prefix); run it with

    python -m pytest -q -s tests/bench_publish_requests.py
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.objectstores import gcs_server, gcs_store, s3_server, s3_store  # noqa: F401
from scripts._request_counter import count_requests
from transforms.writers import OutputLayout

N = int(os.environ.get("BENCH_FILES", "50"))


def _stage(layout: OutputLayout, n: int) -> list[dict]:
    """Write n shards of one tiny Parquet file each into the staging layout, with each shard's
    marker and key file and the run's `_run.json`, as a real run leaves them; return the markers."""
    import numpy as np

    layout.write_run_info({"run_id": layout.run_id})
    results = []
    for k in range(n):
        shard = f"{k:05d}"
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": [f"{shard}-{i}" for i in range(10)], "x": list(range(10))}), buf)
        data = buf.getvalue()
        layout.fs.pipe_file(f"{layout.shard_dir(shard)}/part-0.parquet", data)
        r = {"shard": shard, "files": [{"path": "part-0.parquet", "final_path": f"part-{shard}.parquet", "rows": 10, "bytes": len(data)}], "rows": 10, "dead_letters": 0, "dead_reasons": {}}
        layout.write_marker(shard, r)
        layout.write_keys(shard, np.zeros(10, dtype="S16"), np.arange(10))
        results.append(r)
    return results


@pytest.mark.parametrize("which", ["s3", "gcs"])
def test_requests_per_file_today(which, request):
    st = request.getfixturevalue(f"{which}_store")
    layout = OutputLayout(f"{st.url}/out", "run1")
    results = _stage(layout, N)
    layout.fs.invalidate_cache()
    with count_requests(store=which) as a:
        assembled = layout.assemble(results)
    with count_requests(store=which) as p:
        layout.publish({"run_id": "run1", "shards": assembled}, overwrite=False)
    files = sorted(f.rsplit("/", 1)[-1] for f in st.fs.find(f"{st.path}/out"))
    assert files == sorted([f"part-{k:05d}.parquet" for k in range(N)] + ["_manifest.json", "_SUCCESS"]), files[:5]
    assert not st.fs.exists(layout.run_dir)
    total = a.total + p.total
    copies = a.by_kind.get("copy", 0) + p.by_kind.get("copy", 0) + a.by_kind.get("upload_part_copy", 0) + p.by_kind.get("upload_part_copy", 0)
    print(f"\n[{which}] {N} files: assemble {a.summary()}")
    print(f"[{which}] {N} files: publish  {p.summary()}")
    failed = [r for r in a.requests + p.requests if r.status >= 400]
    if failed:
        import collections

        print(f"[{which}] answered >= 400: {dict(collections.Counter((r.kind, r.status) for r in failed))}")
    print(f"[{which}] per data file: {total / N:.2f} requests ({a.total / N:.2f} assemble + {p.total / N:.2f} publish), {copies / N:.2f} server-side copies")
