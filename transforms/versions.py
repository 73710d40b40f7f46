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


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def extraction_fields(config: Mapping) -> dict:
    """The flattened config fields that decide an extracted row's values."""
    return {k: v for k, v in _flatten(config).items() if k not in EXTRACTION_IGNORED}


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
    if manifest is latest or rel in _latest_paths(latest):
        return f"{root}/{rel}"
    return f"{history_root(root)}/{rel}"


_PATHS: dict[int, frozenset] = {}


def _latest_paths(latest: Mapping) -> frozenset:
    key = id(latest)
    if key not in _PATHS:
        _PATHS.clear()
        _PATHS[key] = frozenset([f["path"] for f in latest.get("files", [])] + list(latest.get("dead_letter_files", [])))
    return _PATHS[key]


def referenced(m: Mapping) -> set[str]:
    """Relative paths a version needs: data files, dead-letter files."""
    return {f["path"] for f in m.get("files", [])} | set(m.get("dead_letter_files", []))


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
        need = set().union(*(referenced(m) for m in kept))
        need |= {i["keys"] for m in kept for i in m.get("inputs", []) if i.get("keys")}
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
