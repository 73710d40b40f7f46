"""Versions of an output: where earlier versions' files and manifests live, reading one back,
and `vacuum`.

```
<out>/                          exactly the latest version: its data files, _manifest.json
                                (with `version`, `parent`, `lineage`, `created`), _SUCCESS, sidecars
<out>.layerbeam-history/
    _versions/000003.json       every committed version's manifest (the latest's too)
    _keys/<run>-<shard>.npz     the key hashes of each committed shard (the duplicate-key
                                check of a later incremental run covers reused shards with them)
    <relative path>             data and dead-letter files that left the latest version
```

A data file's relative path names one content for the whole life of an output (file names
carry the run id, and the run id covers the parent version), so a version's file is either
in `<out>/` (the latest version lists it) or in the history folder under the same path. The
history folder sits beside the output, not inside it, so glob and folder readers of `<out>`
(pyarrow, Spark, DuckDB, HF `load_dataset`, TFDS) see exactly the latest version.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping

from ._fs import fsspec_fs
from .errors import OutputError

__all__ = [
    "HISTORY", "history_root", "version_path", "manifest_version", "latest_manifest", "list_versions",
    "load_version", "resolve", "extraction_fields", "extraction_fingerprint", "vacuum",
]

HISTORY = ".layerbeam-history"

# Config fields that do not change an extracted row's values: where the output goes, how a
# run is allowed to end, how the input is found (a scheduler templates the pattern by date),
# how big batches are. A committed shard is reused across them; any other field differs → the
# extraction differs.
EXTRACTION_IGNORED = frozenset({
    "output.path", "output.overwrite", "output.max_dead_letter_fraction", "output.max_files", "output.allow_empty",
    "input.pattern", "input.max_shards",
    "batching.batch_size", "batching.max_batch_bytes", "batching.max_gpus",
})


def history_root(out: str) -> str:
    return f"{out.rstrip('/')}{HISTORY}"


def version_path(out: str, n: int) -> str:
    return f"{history_root(out)}/_versions/{int(n):06d}.json"


def manifest_version(m: Mapping) -> int:
    """A manifest's version number (outputs written before versions existed are version 1)."""
    return int(m.get("version") or 1)


def flatten(d: Mapping, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys (`output.path`)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def extraction_fields(config: Mapping) -> dict:
    """The flattened config fields that decide an extracted row's values."""
    return {k: v for k, v in flatten(config).items() if k not in EXTRACTION_IGNORED}


def extraction_fingerprint(config: Mapping, model_fingerprint: str) -> str:
    """Model weights + extraction config: equal fingerprints give equal rows for equal input."""
    blob = json.dumps([extraction_fields(config), model_fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(fs, path: str) -> dict | None:
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "r") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def latest_manifest(out: str, fs=None) -> dict | None:
    """The committed output's manifest (None without `_SUCCESS` or a layerbeam manifest)."""
    if fs is None:
        fs, out = fsspec_fs(out.rstrip("/"))
    if not fs.exists(f"{out}/_SUCCESS"):
        return None
    m = _read_json(fs, f"{out}/_manifest.json")
    return m if m and "layerbeam_manifest" in m else None


def list_versions(out: str) -> list[dict]:
    """Every readable version's manifest, oldest first (a version manifest written by a
    commit that then failed, numbered above the latest, is not a version)."""
    fs, root = fsspec_fs(out.rstrip("/"))
    latest = latest_manifest(root, fs)
    if latest is None:
        return []
    top = manifest_version(latest)
    found: dict[int, dict] = {}
    try:
        names = fs.ls(posixpath.dirname(version_path(root, 0)), detail=False)
    except (FileNotFoundError, OSError):
        names = []
    for p in names:
        stem = posixpath.basename(p.rstrip("/")).split(".")[0]
        if stem.isdigit() and int(stem) < top:
            m = _read_json(fs, p)
            if m is not None:
                found[int(stem)] = m
    found[top] = latest
    return [found[n] for n in sorted(found)]


def load_version(out: str, version: int | None) -> tuple[dict, dict]:
    """(manifest of `version`, latest manifest); `version` None: the latest.

    Raises:
        OutputError: no complete output, or no such version (the message lists those kept).
    """
    fs, root = fsspec_fs(out.rstrip("/"))
    latest = latest_manifest(root, fs)
    if latest is None:
        raise OutputError(f"{out!r} is not a complete layerbeam output (no _SUCCESS); wait for the run to finish or re-run it")
    if version is None or int(version) == manifest_version(latest):
        return latest, latest
    m = _read_json(fs, version_path(root, version)) if 0 < int(version) < manifest_version(latest) else None
    if m is None:
        have = [manifest_version(v) for v in list_versions(out)]
        raise OutputError(f"{out!r} has no version {version}; its versions are {have} (vacuum removes older ones); see `layerbeam history {out}`")
    return m, latest


def resolve(out: str, manifest: Mapping, latest: Mapping, rel: str) -> str:
    """Where file `rel` of `manifest` lies: in `<out>/` if the latest version lists it, else
    in the history folder."""
    root = out.rstrip("/")
    if manifest is latest or rel in _latest_paths(latest, root):
        return f"{root}/{rel}"
    return f"{history_root(root)}/{rel}"


_PATHS: dict[int, frozenset] = {}


def _latest_paths(latest: Mapping, root: str) -> frozenset:
    key = id(latest)
    if key not in _PATHS:
        _PATHS.clear()
        _PATHS[key] = frozenset(referenced(latest, root))
    return _PATHS[key]


# ------------------------------------------------------------------ the manifest's big lists
#
# A reader loads `_manifest.json` whole. Above FILES_INLINE files or input shards, the
# per-file and per-input lists go to Parquet sidecars beside it (`_files-<run>.parquet`,
# `_inputs-<run>.parquet`: `_`-prefixed, so folder readers skip them; named per run, so an
# object store's one-PUT manifest switch never pairs a manifest with another version's list),
# and the manifest names them (`files_file`, `inputs_file`, with `files_count`). A reader
# then loads only the path column. Every consumer goes through `files_of` / `inputs_of`.

FILES_INLINE = 10_000


def spill(manifest: dict, run_id: str) -> dict[str, bytes]:
    """Move a big manifest's `files` and `inputs` into sidecars; return {name: bytes}."""
    files, inputs = manifest.get("files", []), manifest.get("inputs", [])
    if len(files) <= FILES_INLINE and len(inputs) <= FILES_INLINE:
        return {}
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    names = {"files": f"_files-{run_id[:8]}.parquet", "inputs": f"_inputs-{run_id[:8]}.parquet"}
    out = {
        names["files"]: parquet(pa.table({
            "path": [f["path"] for f in files], "rows": pa.array([f["rows"] for f in files], pa.int64()),
            "bytes": pa.array([f["bytes"] for f in files], pa.int64()), "shard": [f.get("shard") for f in files],
        })),
        # entries differ by input kind (paths or an image span): one JSON document each
        names["inputs"]: parquet(pa.table({"shard": [i["shard"] for i in inputs], "entry": [json.dumps(i, separators=(",", ":")) for i in inputs]})),
    }
    del manifest["files"], manifest["inputs"]
    manifest.update(files_file=names["files"], files_count=len(files), inputs_file=names["inputs"])
    return out


def _sidecar(m: Mapping, root: str, latest: Mapping | None, name: str, columns=None):
    import pyarrow.parquet as pq

    where = f"{root.rstrip('/')}/{name}" if latest is None else resolve(root, m, latest, name)
    fs, path = fsspec_fs(where)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def files_of(m: Mapping, root: str, latest: Mapping | None = None) -> list[dict]:
    """A manifest's `files` (`root`: the folder its sidecar is in, or the output with
    `latest`, the latest version's manifest, for an earlier version's)."""
    if "files" in m:
        return m["files"]
    return _sidecar(m, root, latest, m["files_file"]).to_pylist()


def paths_of(m: Mapping, root: str, latest: Mapping | None = None) -> list[str]:
    """The relative paths of a manifest's data files (only that column is read)."""
    if "files" in m:
        return [f["path"] for f in m["files"]]
    return _sidecar(m, root, latest, m["files_file"], ["path"]).column("path").to_pylist()


def inputs_of(m: Mapping, root: str, latest: Mapping | None = None) -> list[dict]:
    if "inputs" in m:
        return m["inputs"]
    return [json.loads(e) for e in _sidecar(m, root, latest, m["inputs_file"], ["entry"]).column("entry").to_pylist()]


def referenced(m: Mapping, root: str, latest: Mapping | None = None) -> set[str]:
    """Relative paths a version needs: data files, dead-letter files, its sidecars."""
    own = {m[k] for k in ("files_file", "inputs_file") if m.get(k)}
    return set(paths_of(m, root, latest)) | set(m.get("dead_letter_files", [])) | own


def vacuum(out: str, keep: int) -> dict:
    """Delete history no kept version needs: the files and version manifests of versions
    older than the `keep` newest (never the latest's files, which are in `<out>/`), and key
    hashes no kept version lists. Holds the output's lock, so no run commits meanwhile.

    Returns:
        {"kept": [version numbers], "removed_versions": [...], "files": n, "bytes": b}.
    """
    from .commit import OutputLock
    from .staging import OutputLayout

    if keep < 1:
        raise OutputError(f"--keep {keep} must be at least 1 (the latest version is always kept)")
    fs, root = fsspec_fs(out.rstrip("/"))
    versions = list_versions(out)
    if not versions:
        raise OutputError(f"{out!r} is not a complete layerbeam output (no _SUCCESS); nothing to vacuum")
    layout = OutputLayout(out, "vacuum")
    lock = OutputLock(layout)
    lock.acquire()
    try:
        kept, dropped = versions[-keep:], versions[:-keep]
        latest = versions[-1]
        need = set().union(*(referenced(m, root, latest) for m in kept))
        need |= {i["keys"] for m in kept for i in inputs_of(m, root, latest) if i.get("keys")}
        hist = history_root(root)
        try:
            found = fs.find(hist, detail=True)
        except FileNotFoundError:
            found = {}
        hroot = fs._strip_protocol(hist).rstrip("/")
        # key hashes of runs still staged (crashed, to be resumed) are theirs to commit
        staged = {r[:8] for r in layout.other_runs()}
        gone, freed = [], 0
        for p, info in found.items():
            rel = fs._strip_protocol(p)[len(hroot) + 1:]
            if rel.startswith("_versions/"):
                stem = posixpath.basename(rel).split(".")[0]
                if stem.isdigit() and int(stem) in {manifest_version(m) for m in kept}:
                    continue
            elif rel in need or (rel.startswith("_keys/") and posixpath.basename(rel)[:8] in staged):
                continue
            gone.append(p)
            freed += int(info.get("size") or 0)
        if gone:
            fs.rm(gone)
        return {"kept": [manifest_version(m) for m in kept], "removed_versions": [manifest_version(m) for m in dropped], "files": len(gone), "bytes": freed}
    finally:
        lock.release()
