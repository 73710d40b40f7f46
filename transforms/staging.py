"""Where a run's files live before the commit, and the small writes workers make there.

```
<out>/                              the committed output (readers look here)
<out>.layerbeam-staging/
    _lock                           held by the run writing <out>: pid, host, run
    <run>/                          one run (run = config + model + input shards fingerprint)
        _run.json                   what the run is: config, model fingerprint, shards
        shards/<shard>/...          one input shard's data files (deterministic names)
        shards/<shard>.done.json    the shard's marker: its `ShardResult`
        dead/<shard>.parquet        the shard's dead letters
        keys/<shard>.npz            the shard's key hashes and record indices
        final/                      the output as assembled by the commit
```
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from ._fs import fsspec_fs

__all__ = ["OutputLayout"]


class OutputLayout:
    """The paths of one run's staging and of the output, and the worker-side writes
    (markers, key hashes, run info), each atomic: written aside, then moved into place.
    The lock and the commit are in `commit.py`."""

    MANIFEST = "_manifest.json"
    SUCCESS = "_SUCCESS"
    DEAD_DIR = "_dead_letters"
    LOCK = "_lock"
    RUN_INFO = "_run.json"

    def __init__(self, out: str, run_id: str):
        # file:///x is /x: the local commit renames with os.* calls, which take plain paths
        self.out = (out[len("file://"):] if out.startswith("file://") else out).rstrip("/")
        self.run_id = run_id
        self.staging_root = f"{self.out}.layerbeam-staging"
        self.run_dir = f"{self.staging_root}/{run_id}"
        self.fs, _ = fsspec_fs(self.out)

    # ------------------------------------------------------------------ per shard

    def shard_dir(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}"

    def marker(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}.done.json"

    def dead_file(self, shard_id: str) -> str:
        return f"{self.run_dir}/dead/{shard_id}.parquet"

    def keys_file(self, shard_id: str) -> str:
        return f"{self.run_dir}/keys/{shard_id}.npz"

    def clear_shard(self, shard_id: str) -> None:
        """Remove a shard's partial files before (re)writing it: a retried bundle or a
        resumed run rewrites the shard from scratch, never appends to it."""
        for p in (self.marker(shard_id), self.shard_dir(shard_id), self.dead_file(shard_id), self.keys_file(shard_id)):
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    def read_marker(self, shard_id: str) -> dict | None:
        p = self.marker(shard_id)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def write_marker(self, shard_id: str, result: Mapping) -> None:
        self._write_atomic(self.marker(shard_id), json.dumps(result).encode())

    def write_keys(self, shard_id: str, hashes: np.ndarray, index: np.ndarray) -> None:
        """Store the key hashes (`S16`) of the rows a shard wrote, with their record indices."""
        import io

        buf = io.BytesIO()
        np.savez(buf, hash=hashes.astype("S16"), index=index.astype(np.int64))
        self._write_atomic(self.keys_file(shard_id), buf.getvalue())

    def read_keys(self, shard_id: str) -> tuple[np.ndarray, np.ndarray]:
        import io

        with self.fs.open(self.keys_file(shard_id), "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            return z["hash"], z["index"]

    def _write_atomic(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    # ------------------------------------------------------------------ the run

    def is_complete(self) -> bool:
        return self.fs.exists(f"{self.out}/{self.SUCCESS}")

    def committed_run_id(self) -> str | None:
        """The run id in the committed output's manifest, if there is one."""
        try:
            with self.fs.open(f"{self.out}/{self.MANIFEST}", "r") as f:
                return json.load(f).get("run_id")
        except (OSError, ValueError):
            return None

    def has_foreign_files(self) -> bool:
        """`<out>` holds files but no `_SUCCESS`: not a complete layerbeam output."""
        return self.fs.exists(self.out) and not self.is_complete() and bool(self.fs.ls(self.out))

    def other_runs(self) -> list[str]:
        """Run ids of other (half-built) runs staged for the same output."""
        if not self.fs.exists(self.staging_root):
            return []
        out = []
        for p in self.fs.ls(self.staging_root, detail=True):
            name = posixpath.basename(p["name"].rstrip("/"))
            if p["type"] == "directory" and name != self.run_id and not name.startswith(("old-", "_", ".")):
                out.append(name)
        return sorted(out)

    def read_run_info(self, run_id: str | None = None) -> dict | None:
        p = f"{self.staging_root}/{run_id or self.run_id}/{self.RUN_INFO}"
        try:
            with self.fs.open(p, "r") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write_run_info(self, info: Mapping) -> None:
        self._write_atomic(f"{self.run_dir}/{self.RUN_INFO}", json.dumps(info, sort_keys=True).encode())

    def discard_runs(self, run_ids: Sequence[str]) -> None:
        for r in run_ids:
            p = f"{self.staging_root}/{r}"
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)
