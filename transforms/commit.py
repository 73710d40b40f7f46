"""The commit: the output's lock, reconciling every shard's counts, the cross-shard
duplicate-key check, the manifest, and publishing. Beam-free: the CLI job,
`layerbeam.extract(..., output=...)` and `WriteLayers` all commit through `commit_run`.

Commit, in two steps. `assemble` moves (or, for shards that lose rows to keys repeated
across shards, copies and filters) every shard's files into `<run>/final/`; it can be
repeated after a crash: a file already moved is found at its destination. `publish`
writes the manifest and `_SUCCESS` there and, on a local file system, renames the folder
to `<out>` in one step (an old output is first renamed aside, then deleted; between the
two renames a reader finds no output, never a mix). On object stores, where no folder
rename exists, files are copied in and `_manifest.json` and `_SUCCESS` come last: readers
must wait for `_SUCCESS`.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
import hashlib
import json
import math
import os
import posixpath
import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from ._fs import is_local
from .deadletters import DEAD_LETTER_SCHEMA
from .errors import CommitError, ConfigError, OutcomeError
from .formats import final_paths, rewrite_without, sidecars
from .formats.parquet import read_parquet, write_parquet_like
from .staging import OutputLayout
from .stats import merge_results

__all__ = ["OutputLock", "commit_run", "check_outcome", "inputs_digest", "assemble", "publish"]


class OutputLock:
    """The lock of one output (`<out>.layerbeam-staging/_lock`): pid, host, run."""

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.fs = layout.fs
        self.out = layout.out
        self.staging_root = layout.staging_root
        self.run_id = layout.run_id

    @property
    def lock_path(self) -> str:
        return f"{self.staging_root}/{self.layout.LOCK}"

    def holder(self) -> dict | None:
        """Who holds the output's lock, if anyone still alive does.

        Staleness: a lock taken on this host by a process that no longer exists is stale
        (a killed run); a lock from another host is never judged stale here: its message
        says which file to delete once that run is known to be gone.
        """
        try:
            with self.fs.open(self.lock_path, "r") as f:
                holder = json.load(f)
        except OSError:  # no lock (or no staging folder: the writability check says why)
            return None
        except ValueError:  # a half-written lock: someone is taking it right now
            return {"pid": None, "host": "?", "run_id": "?", "since": "?"}
        if holder.get("host") == _host() and not _pid_alive(holder.get("pid")):
            return None
        return holder

    def error(self, holder: Mapping):
        """The one-line refusal when another run (`holder`, from `holder`) writes here."""
        return ConfigError(
            f"output {self.out!r} is being written by another run (pid {holder.get('pid')} on {holder.get('host')}, "
            f"run {holder.get('run_id')}, since {holder.get('since')}); wait for it to finish, or if it is gone delete {self.lock_path}"
        )

    def acquire(self) -> None:
        """Take the output's lock, or raise `ConfigError` naming the run that holds it.

        On a local file system the lock file is created with O_CREAT|O_EXCL, so two runs
        starting together cannot both get it. On object stores the check and the write are
        two steps (no exclusive create): do not start two runs for one output at once.
        """
        me = {"pid": os.getpid(), "host": _host(), "run_id": self.run_id, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = json.dumps(me).encode()
        for _ in range(2):
            holder = self.holder()
            if holder is not None:
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return
                raise self.error(holder)
            if self.fs.exists(self.lock_path):  # stale: its process is gone
                self.fs.rm(self.lock_path)
            self.fs.makedirs(self.staging_root, exist_ok=True)
            if is_local(self.fs):
                try:
                    fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    continue  # another run got there first; look at it again
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return
            with self.fs.open(self.lock_path, "wb") as f:
                f.write(data)
            return
        raise ConfigError(f"could not take the lock {self.lock_path}; another run is starting for {self.out!r}; try again")

    def release(self) -> None:
        """Drop the lock (if this process holds it) and the staging root if nothing is left."""
        try:
            with self.fs.open(self.lock_path, "r") as f:
                holder = json.load(f)
            if holder.get("pid") == os.getpid() and holder.get("host") == _host():
                self.fs.rm(self.lock_path)
        except (OSError, ValueError):
            pass
        try:
            if self.fs.exists(self.staging_root) and not [p for p in self.fs.ls(self.staging_root) if not posixpath.basename(p.rstrip("/")).startswith(".probe")]:
                self.fs.rm(self.staging_root, recursive=True)
        except OSError:
            pass


def inputs_digest(shards) -> str:
    """A digest of the shard list: (id, paths, bytes) of `Shard`s or of `Plan.inputs` tuples
    (a file rewritten under the same name changes its size, hence the digest)."""
    items = sorted((s.id, tuple(s.paths), s.size) if hasattr(s, "id") else (s[0], tuple(s[1]), s[2]) for s in shards)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def commit_run(results: list[dict], shards: list, manifest_base: Mapping, run_id: str, planned_inputs: str | None = None) -> dict:
    """Check that every shard is there and the counts add up, then commit the output.

    Records whose key an earlier shard (in shard order) already wrote are left out here and
    become `duplicate_key` dead letters: each shard stored its rows' 128-bit key hashes, so
    this check needs about 100 bytes of memory per row written at its peak. Repeats within a shard were
    already removed by the shard's worker.

    Args:
        planned_inputs: `inputs_digest` of the shards the launcher listed (and the run id
            was computed from); the workers list the pattern again, and a difference
            means the input changed during the run.

    Raises:
        CommitError: the input changed since the launcher listed it, a shard is missing or
            doubled, counts do not reconcile (`read = written + dead`), or workers built
            different models. Nothing is committed then.
        OutcomeError: no rows, or too many dead letters (`check_outcome`).
    """
    results = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results]
    cfg = manifest_base["config"]
    if planned_inputs is not None and inputs_digest(shards) != planned_inputs:
        raise CommitError(
            f"the files matching input.pattern {cfg['input']['pattern']!r} changed while the job ran "
            f"({len(shards)} shards now); nothing committed. Re-run when the input is stable (finished shards are kept only for the same input)"
        )
    expected = {s.id for s in shards}
    got = [r["shard"] for r in results]
    if sorted(got) != sorted(expected):
        counts = Counter(got)
        missing = sorted(expected - set(got))
        extra = sorted({g for g, n in counts.items() if n > 1} | (set(got) - expected))
        raise CommitError(f"shard results do not match the input: missing {missing}, unexpected or doubled {extra}; nothing committed")
    fps = {r["model_fingerprint"] for r in results}
    if fps != {manifest_base["model"]["fingerprint"]}:
        raise CommitError(f"workers built models with different weights {sorted(fps)}; set model.seed or use a weights file")
    layout = OutputLayout(cfg["output"]["path"], run_id)
    results = _name_files(cfg["output"]["format"], results, run_id)
    results = assemble(layout, results, _repeated_keys(layout, results))
    read = sum(r["read"] for r in results)
    rows = sum(r["rows"] for r in results)
    dead = sum(r["dead_letters"] for r in results)
    for r in results:
        if r["read"] != r["rows"] + r["dead_letters"]:
            raise CommitError(f"shard {r['shard']}: read {r['read']} records but wrote {r['rows']} rows + {r['dead_letters']} dead letters; nothing committed")
    if read != rows + dead:
        raise CommitError(f"read {read} records but wrote {rows} rows + {dead} dead letters; nothing committed")
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["dead_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    shard_errors = [dict(e, shard=r["shard"], records_kept=r["read"]) for r in results for e in r.get("shard_errors", ())]
    files = [dict(f, shard=r["shard"]) for r in results for f in r["files"]]
    manifest = dict(manifest_base)
    manifest.update(
        {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "counts": {
                "records_read": read,
                "rows_written": rows,
                "dead_letters": dead,
                "dead_letter_reasons": dict(sorted(reasons.items())),
            },
            "shard_errors": shard_errors,
            "inputs": [{"shard": r["shard"], "paths": r["paths"], "bytes": r["bytes_in"], "records": r["read"], "rows": r["rows"], "dead_letters": r["dead_letters"], "timing": r.get("timing")} for r in results],
            "files": [{"path": f["final_path"], "rows": f["rows"], "bytes": f["bytes"], "shard": f["shard"]} for f in files],
            "dead_letter_files": [f"{layout.DEAD_DIR}/{r['shard']}.parquet" for r in results if r["dead_letters"] or r.get("shard_errors")],
            "partition_by": cfg["output"]["partition_by"],
            "format": cfg["output"]["format"],
        }
    )
    check_outcome(dict(manifest["counts"], shard_errors=shard_errors), cfg["output"].get("max_dead_letter_fraction"), cfg["output"].get("allow_empty", False))
    manifest["statistics"] = merge_results(results)  # the shards' partial statistics, merged
    publish(layout, manifest, overwrite=cfg["output"]["overwrite"])
    return manifest["counts"]


def _name_files(fmt: str, results: Sequence[Mapping], run_id: str) -> list[dict]:
    """Each data file's committed name, as its format wants it (TFDS shard names for
    TFRecord), over all shards in shard order."""
    results = sorted((dict(r) for r in results), key=lambda r: r["shard"])
    staged = [f["final_path"] for r in results for f in r["files"]]
    names = iter(final_paths(fmt, staged, run_id))
    for r in results:
        r["files"] = [dict(f, final_path=next(names)) for f in r["files"]]
    return results


def check_outcome(counts: Mapping, max_fraction: float | None, allow_empty: bool = False) -> None:
    """The last check before publishing: is this run's outcome worth a `_SUCCESS`?

    A run with no rows always fails (every record a dead letter, or no record read at all,
    e.g. a wrong `input.compression` failing every shard); so does one whose dead letters
    exceed `max_fraction` of the records read (`output.max_dead_letter_fraction`; None:
    no limit). `allow_empty` lets an input of no records at all commit an empty output:
    `WriteLayers` of an empty PCollection writes one, a file-pattern job never does. Nothing is published then; the shards stay staged, so the same command with
    the input fixed, or with a higher limit, resumes instead of redoing them.

    Args:
        counts: `records_read`, `rows_written`, `dead_letters`, `dead_letter_reasons`, and
            optionally `shard_errors` (`[{reason, detail, path, ...}]`: shards that failed
            as a whole, the first named in the message).

    Raises:
        OutcomeError: naming the counts, the top reasons and the fix.
    """
    read, rows, dead = counts["records_read"], counts["rows_written"], counts["dead_letters"]
    reasons = sorted(counts.get("dead_letter_reasons", {}).items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{r} {n:,}" for r, n in reasons[:3])
    errs = list(counts.get("shard_errors") or ())
    whole = ""
    if errs:
        e = errs[0]
        whole = f", {len(errs)} shard error{'s' if len(errs) != 1 else ''}, e.g. {e.get('reason')} in {e.get('path')}: {str(e.get('detail', ''))[:160]}"
    if rows == 0 and not (allow_empty and read == 0):
        why = f"all {read:,} records became dead letters ({top})" if read else "no record was read"
        raise OutcomeError(
            f"the run wrote no rows: {why}{whole}; nothing was published. See the dead letters under the output's staging folder; "
            "fix the config (feature names, types, input.compression, input.format) and run again",
            dict(counts),
        )
    if max_fraction is not None and read and dead / read > max_fraction:
        raise OutcomeError(
            f"{dead:,} of {read:,} records ({dead / read:.1%}) became dead letters, over output.max_dead_letter_fraction = {max_fraction:g} "
            f"({top}{whole}); nothing was published, finished shards are kept. Fix the input or config, or accept them: "
            f"--max-dead-letter-fraction {min(1.0, math.ceil(dead / read * 1000 - 1e-9) / 1000):g} (the same command resumes)",
            dict(counts),
        )


def _repeated_keys(layout, results: Sequence[Mapping]) -> dict[str, dict[bytes, dict]]:
    """shard id → {key hash: dead-letter row} for rows whose key an earlier shard wrote.

    The earliest (shard id, record index) keeps the key; every later one is dropped.
    Vectorized over all rows (about 100 bytes of memory per row at its peak: hashes,
    indices, the sort order and sorted copies); Python runs only once per repeated key.
    """
    order = sorted(results, key=lambda r: r["shard"])
    hashes, ranks, index = [], [], []
    for rank, r in enumerate(order):
        h, i = layout.read_keys(r["shard"])
        hashes.append(h)
        index.append(i)
        ranks.append(np.full(len(h), rank, np.int64))
    if not hashes:
        return {}
    h, rank, idx = np.concatenate(hashes), np.concatenate(ranks), np.concatenate(index)
    sort = np.lexsort((idx, rank, h))  # by hash, then shard order, then record index
    h, rank, idx = h[sort], rank[sort], idx[sort]
    later = np.concatenate([[False], h[1:] == h[:-1]])
    if not later.any():
        return {}
    first = np.flatnonzero(~later)[np.cumsum(~later) - 1]  # position of each run's first row
    drop: dict[str, dict[bytes, dict]] = {}
    for j in np.flatnonzero(later):
        r = order[rank[j]]
        f = first[j]
        drop.setdefault(r["shard"], {})[h[j].tobytes()] = {
            "key": None,  # filled in from the row by the commit
            "shard": r["paths"][0] if len(r["paths"]) == 1 else r["paths"][int(idx[j])],
            "index": int(idx[j]),
            "stage": "dedupe",
            "reason": "duplicate_key",
            "detail": f"the key was already written by record {int(idx[f])} of shard {order[rank[f]]['shard']}",
        }
    return drop


def assemble(layout: OutputLayout, results: Sequence[Mapping], drop: Mapping[str, Mapping[bytes, Mapping]] | None = None) -> list[dict]:
    """Bring every shard's files into `<run>/final/`; return the results with the files'
    final row counts and sizes.

    Args:
        results: the shards' results (markers).
        drop: shard id → {key hash: dead-letter row}: rows to leave out of that shard
            (keys an earlier shard wrote) and the dead letters they become. Such a
            shard's files are copied with the rows filtered out; its staged files stay,
            so a repeated commit gives the same result.
    """
    drop = drop or {}
    final = f"{layout.run_dir}/final"
    layout.fs.makedirs(final, exist_ok=True)
    out = []
    for r in sorted(results, key=lambda r: r["shard"]):
        r = dict(r)
        gone = {h: dict(d) for h, d in drop.get(r["shard"], {}).items()}
        files = []
        for f in r["files"]:
            src = f"{layout.shard_dir(r['shard'])}/{f['path']}"
            dst = f"{final}/{f['final_path']}"
            layout.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            if gone:
                rows = rewrite_without(layout.fs, src, dst, _keep_unless(gone))
                files.append(dict(f, rows=rows, bytes=layout.fs.size(dst)))
                continue
            if layout.fs.exists(src):
                layout.fs.mv(src, dst)
            elif not layout.fs.exists(dst):
                raise CommitError(f"shard {r['shard']}: staged file {src} is missing and was not moved to {dst}; delete {layout.run_dir} and run again")
            files.append(dict(f))  # rows and bytes as the writer verified them
        r["files"] = files
        r["rows"] = sum(f["rows"] for f in files)
        dead_src = layout.dead_file(r["shard"])
        dead_dst = f"{final}/{layout.DEAD_DIR}/{r['shard']}.parquet"
        if gone:
            extra = pa.Table.from_pylist(sorted(gone.values(), key=lambda d: d["index"]), schema=DEAD_LETTER_SCHEMA)
            staged = read_parquet(layout.fs, dead_src) if layout.fs.exists(dead_src) else DEAD_LETTER_SCHEMA.empty_table()
            layout.fs.makedirs(posixpath.dirname(dead_dst), exist_ok=True)
            write_parquet_like(layout.fs, None, dead_dst, pa.concat_tables([staged.cast(DEAD_LETTER_SCHEMA), extra]))
            r["dead_letters"] = r["dead_letters"] + len(gone)
            reasons = dict(r["dead_reasons"])
            reasons["duplicate_key"] = reasons.get("duplicate_key", 0) + len(gone)
            r["dead_reasons"] = reasons
        elif layout.fs.exists(dead_src):
            layout.fs.makedirs(posixpath.dirname(dead_dst), exist_ok=True)
            layout.fs.mv(dead_src, dead_dst)
        out.append(r)
    return out


def publish(layout: OutputLayout, manifest: Mapping, overwrite: bool) -> None:
    """Write the manifest and `_SUCCESS` into the assembled output and put it in place."""
    final = f"{layout.run_dir}/final"
    fmt = manifest.get("storage", {}).get("format")
    for name, data in (sidecars(fmt, manifest) if fmt else {}).items():  # e.g. TFDS metadata
        with layout.fs.open(f"{final}/{name}", "wb") as f:
            f.write(data)
    with layout.fs.open(f"{final}/{layout.MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
    with layout.fs.open(f"{final}/{layout.SUCCESS}", "w") as f:
        f.write("")
    _publish(layout, final, overwrite)
    layout.fs.rm(layout.run_dir, recursive=True)


def _publish(layout: OutputLayout, final: str, overwrite: bool) -> None:
    exists = layout.fs.exists(layout.out)
    if exists and not overwrite and layout.fs.ls(layout.out):
        raise CommitError(f"output {layout.out!r} appeared during the run; nothing was replaced. Re-run with --overwrite to replace it")
    if is_local(layout.fs):
        old = f"{layout.staging_root}/old-{uuid.uuid4().hex[:8]}"
        if exists:
            os.rename(layout.out, old)
        os.rename(final, layout.out)
        if exists:
            layout.fs.rm(old, recursive=True)
        return
    if exists:
        layout.fs.rm(layout.out, recursive=True)
    files = [p for p in layout.fs.find(final) if not p.endswith((layout.MANIFEST, layout.SUCCESS))]
    for p in files:
        rel = posixpath.relpath(p, final.split("://", 1)[-1] if "://" in final else final)
        layout.fs.mv(p, f"{layout.out}/{rel}")
    for name in (layout.MANIFEST, layout.SUCCESS):
        layout.fs.mv(f"{final}/{name}", f"{layout.out}/{name}")


def _host() -> str:
    import socket

    return socket.gethostname()


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unreadable: assume alive, the message says what to delete
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _keep_unless(gone: dict[bytes, dict]):
    """keys → mask of rows to keep: False for rows whose key hash is in `gone` (whose
    dead-letter rows get the key filled in)."""
    from .shard import key_hashes

    def keep(keys) -> np.ndarray:
        hashes = key_hashes(keys)
        for k, h in zip(keys, hashes.tolist()):
            if h in gone:
                gone[h]["key"] = k.decode() if isinstance(k, bytes) else k
        return ~np.isin(hashes, np.array(list(gone), dtype=hashes.dtype))

    return keep
