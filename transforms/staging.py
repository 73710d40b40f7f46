"""Where a run's files live before the commit, and the small writes workers make there.

```
<out>/                              the committed output (readers look here)
<out>.layerbeam-staging/
    _lock.<n>                       the lock: the highest n is the holder (pid, host, run, token)
    <run>/                          one run (run = config + model + input shards fingerprint)
        _run.json                   what the run is: config, model fingerprint, shards
        _publishing                 the commit has started putting files into <out>
        shards/<shard>/<attempt>/   one attempt of one input shard: its data files, and
            _dead.parquet           its dead letters
<out>.layerbeam-history/_keys/<run>-<shard>-<attempt>.npz
                                    the key hashes and record indices of an attempt's rows
                                    (kept with the versions: see versions.py)
        shards/<shard>/<attempt>.dedupe/   the attempt's files without keys an earlier shard wrote
        shards/<shard>.done.json    the shard's marker: the `ShardResult` of the attempt that finished
        final/                      local file systems: the output as assembled by the commit
```

Every attempt of a shard (a retried bundle, a zombie worker, a second run that took over a
stale lock) writes under its own attempt id, so no attempt can overwrite or truncate
another's files; the commit takes only the files of the attempt whose `ShardResult` reached it.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from ._fs import fsspec_fs, is_local

__all__ = ["OutputLayout", "key_hashes", "KEY_HASH_DTYPE"]

KEY_HASH_DTYPE = "S16"


def key_hashes(keys) -> np.ndarray:
    """128-bit BLAKE2b of each key (bytes or str), as `S16`: stable across processes; used to
    find keys repeated across shards at commit without holding the keys themselves. At
    128 bits, a false match among 10^12 keys has a probability below 10^-14."""
    import hashlib

    return np.array(
        [hashlib.blake2b(k if isinstance(k, bytes) else str(k).encode(), digest_size=16).digest() for k in keys],
        dtype=KEY_HASH_DTYPE,
    ).reshape(len(keys))


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

    def shard_dir(self, shard_id: str, attempt: str = "") -> str:
        """The folder of one attempt of a shard (without `attempt`: of all its attempts)."""
        return f"{self.run_dir}/shards/{shard_id}" + (f"/{attempt}" if attempt else "")

    def dedupe_dir(self, shard_id: str, attempt: str) -> str:
        """Where the commit writes an attempt's files without keys an earlier shard wrote."""
        return f"{self.run_dir}/shards/{shard_id}/{attempt}.dedupe"

    def marker(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}.done.json"

    def dead_file(self, shard_id: str, attempt: str) -> str:
        return f"{self.shard_dir(shard_id, attempt)}/_dead.parquet"

    def keys_file(self, shard_id: str, attempt: str) -> str:
        """Where an attempt writes its key hashes: beside the output, in its history folder
        (`versions.py`), under an attempt-unique name. The commit keeps the accepted
        attempt's where it is (a later incremental run checks new shards against it) and so
        needs no request for it; other attempts' files are left to `vacuum`."""
        return f"{self.keys_root}/{self.keys_name(shard_id, attempt)}"

    @property
    def keys_root(self) -> str:
        return f"{self.out}.layerbeam-history"

    def keys_name(self, shard_id: str, attempt: str) -> str:
        """The key file's path relative to the history folder (what manifests record)."""
        return f"_keys/{self.run_id[:8]}-{shard_id}-{attempt or 'a'}.npz"

    @staticmethod
    def new_attempt() -> str:
        """A fresh attempt id: unique per attempt, so attempts never share a file name."""
        return uuid.uuid4().hex[:16]

    def read_marker(self, shard_id: str) -> dict | None:
        p = self.marker(shard_id)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def write_marker(self, shard_id: str, result: Mapping) -> None:
        self._write_atomic(self.marker(shard_id), json.dumps(result).encode())

    def write_keys(self, shard_id: str, attempt: str, hashes: np.ndarray, index: np.ndarray) -> None:
        """Store the key hashes (`S16`) of the rows a shard wrote, with their record indices."""
        import io

        buf = io.BytesIO()
        np.savez(buf, hash=hashes.astype("S16"), index=index.astype(np.int64))
        self._write_atomic(self.keys_file(shard_id, attempt), buf.getvalue())

    def read_keys(self, shard_id: str, attempt: str) -> tuple[np.ndarray, np.ndarray]:
        import io

        # one GET: `open`, and s3fs's `cat_file` without a range, first ask the size
        z = np.load(io.BytesIO(self.fs.cat_file(self.keys_file(shard_id, attempt), start=0)))
        return z["hash"], z["index"]

    def _write_atomic(self, path: str, data: bytes) -> None:
        if not is_local(self.fs):  # one PUT is atomic on object stores; a rename would be a copy
            self.fs.pipe_file(path, data)
            return
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    # ------------------------------------------------------------------ the run

    @property
    def publishing_flag(self) -> str:
        return f"{self.run_dir}/_publishing"

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
        """`<out>` holds files but no `_SUCCESS`, and they are not this run's own half-published
        files (a commit killed while publishing on an object store): not a layerbeam output."""
        return self.fs.exists(self.out) and not self.is_complete() and bool(self.fs.ls(self.out)) and not self.fs.exists(self.publishing_flag)

    def other_runs(self) -> list[str]:
        """Run ids of other (half-built) runs staged for the same output."""
        # no exists() first: another run's commit may remove the staging root between the two calls
        try:
            listing = self.fs.ls(self.staging_root, detail=True)
        except (FileNotFoundError, NotADirectoryError):  # none staged (or a file where the folder would be:
            return []  # `_check_writable` then names that)
        out = []
        for p in listing:
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
            try:
                self.fs.rm(f"{self.staging_root}/{r}", recursive=True)
            except (FileNotFoundError, NotADirectoryError):  # already gone (never staged, or another run cleaned it up)
                pass
