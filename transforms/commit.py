"""The commit: the output's lock, checking every shard's result, the cross-shard
duplicate-key check, publishing, and the manifest. Beam-free plain functions: the Beam job
runs them distributed (`beam.CommitShards`), `commit_run` runs them in one process
(`layerbeam.extract(..., output=...)`, `WriteLayers`).

The steps, each idempotent (a step killed at any moment and run again ends the same):

1. `check_results` (one step over small per-shard results): every shard there once, counts
   reconcile, one model, the input unchanged, the output still ours to write. Nothing is
   published before it passes.
2. `key_parts` (per shard) → `find_repeats` (per hash bucket): the rows' 128-bit key
   hashes, bucketed by their first bytes, each bucket sorted on its own; a key an earlier
   shard (in shard order) wrote becomes a `duplicate_key` dead letter of the later shard.
   Memory per bucket: ~100 bytes per row of that bucket.
3. `publish_shard` (per shard, in parallel): the files of the attempt whose result reached
   the commit are checked against that result (locally size, Parquet footer row count and
   TFRecord framing; on object stores the copy's response against the store's identity of
   the bytes the attempt reported, else size, footer and the last TFRecord header), filtered of
   repeated keys where a bucket found some (only those shards are rewritten), and put in
   place with one operation per file: a rename into `<run>/final/` on a local file system,
   one server-side copy into `<out>/` on object stores (the staged copy stays until
   `_SUCCESS`, so a re-run copies again instead of finding half-moved files), under its
   final name (`final_names`: TFRecord's TFDS names). Files of the shard's other attempts
   are deleted (object stores: with the staging folder, step 5). It returns a small summary.
4. `finalize` (one step over the summaries, never rows or bytes): the manifest, then
   `_SUCCESS`. On a local file system the assembled folder is renamed to `<out>` (an old
   output is first renamed aside into the run's staging folder, then deleted). On object
   stores the new files already sit beside the old output's under other names; the new
   manifest replaces the old one in one PUT, so a reader that goes through the manifest
   (`layerbeam.read`) sees the old complete output until then and the new one after;
   the old output's files are deleted after `_SUCCESS`.
5. `cleanup_shard` / `cleanup_run`: the staged files, after `_SUCCESS` (object stores: the
   run's staging folder in one recursive delete, batched 1,000 keys per S3 request).

A commit run again after it succeeded finds `_SUCCESS` with its own run id and returns the
committed counts.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import posixpath
import time
import uuid
from importlib import metadata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ._fs import atomic_create_supported, content_id, create_exclusive, is_local, multipart_id
from .deadletters import DEAD_LETTER_SCHEMA
from .errors import CommitError, ConfigError, OutcomeError
from .formats import final_paths, rewrite_without, sidecars
from .formats.parquet import read_parquet, write_parquet_like
from .formats.tfrecord import check_last_record, framed_records
from .staging import OutputLayout
from .stats import merge_results
from .versions import history_root, manifest_version, paths_of, referenced, spill, version_path

__all__ = [
    "OutputLock", "commit_run", "inputs_digest", "check_results", "key_parts", "find_repeats",
    "final_names", "publish_shard", "reuse_shard", "finalize", "cleanup_shard", "cleanup_run", "DEDUPE_BUCKETS", "check_outcome",
]

# Hash buckets of the distributed duplicate-key check: at 10^9 rows a bucket holds ~4 M rows
# (~400 MB at its sort's peak), each on its own worker.
DEDUPE_BUCKETS = 256


class OutputLock:
    """The lock of one output: `<out>.layerbeam-staging/_lock.<n>`, the highest n holds it.

    Taking it is one atomic create-if-absent (`create_exclusive`: a hard link locally,
    `If-None-Match: *` on S3, `ifGenerationMatch=0` on GCS) of the next number, so of any
    number of runs taking it together (or taking over the same stale lock) exactly one
    succeeds (within one process the lock is re-entrant: only its taker releases it); the others see the winner's lock and refuse. Lock files are never deleted while
    the lock is in use (only the holder's own, on release), so a number is never reused
    while anyone could still race for it.
    """

    PREFIX = "_lock."

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.fs = layout.fs
        self.out = layout.out
        self.staging_root = layout.staging_root
        self.run_id = layout.run_id
        self.token = uuid.uuid4().hex  # this lock object: a process may hold several outputs
        self._held: str | None = None

    @property
    def lock_path(self) -> str:
        return self._held or self._current()[0] or f"{self.staging_root}/{self.PREFIX}0"

    def _current(self) -> tuple[str | None, int]:
        """(path of the highest-numbered lock file, its number); (None, -1) if none."""
        self.fs.invalidate_cache(self.staging_root)  # s3fs/gcsfs cache listings
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.staging_root, detail=False)]
        except (FileNotFoundError, OSError):
            return None, -1
        nums = [int(n[len(self.PREFIX):]) for n in names if n.startswith(self.PREFIX) and n[len(self.PREFIX):].isdigit()]
        if not nums:
            return None, -1
        n = max(nums)
        return f"{self.staging_root}/{self.PREFIX}{n}", n

    def _read(self, path: str) -> dict | None:
        try:
            self.fs.invalidate_cache(path)
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable: treat as held, the message says what to delete
            return {"pid": None, "host": "?", "run_id": "?", "since": "?"}

    def holder(self) -> dict | None:
        """Who holds the output's lock, if anyone still alive does.

        Staleness: a lock taken on this host by a process that no longer exists is stale
        (a killed run); a lock from another host is never judged stale here: its message
        says which file to delete once that run is known to be gone.
        """
        path, _ = self._current()
        if path is None:
            return None
        holder = self._read(path)
        if holder is None or (holder.get("host") == _host() and not _pid_alive(holder.get("pid"))):
            return None
        if holder.get("released"):
            return None
        return holder

    def error(self, holder: Mapping):
        """The one-line refusal when another run (`holder`, from `holder`) writes here."""
        return ConfigError(
            f"output {self.out!r} is being written by another run (pid {holder.get('pid')} on {holder.get('host')}, "
            f"run {holder.get('run_id')}, since {holder.get('since')}); wait for it to finish, or if it is gone delete {self.lock_path}"
        )

    def acquire(self) -> None:
        """Take the output's lock, or raise `ConfigError` naming the run that holds it."""
        if self._held:
            return
        me = {"pid": os.getpid(), "host": _host(), "run_id": self.run_id, "token": self.token, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = json.dumps(me).encode()
        if is_local(self.fs):
            self.fs.makedirs(self.staging_root, exist_ok=True)
        for _ in range(20):
            path, n = self._current()
            if path is not None:
                holder = self._read(path)
                alive = holder is not None and not holder.get("released") and not (holder.get("host") == _host() and not _pid_alive(holder.get("pid")))
                if alive and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return  # this process holds it (e.g. `WriteLayers` inside a job): re-entrant, released by its taker
                if alive:
                    raise self.error(holder)
            nxt = f"{self.staging_root}/{self.PREFIX}{n + 1}"
            if atomic_create_supported(self.fs):
                won = create_exclusive(self.fs, nxt, data)
            else:  # e.g. memory://: no atomic create; one process, check then write
                won = not self.fs.exists(nxt)
                if won:
                    self.fs.pipe_file(nxt, data)
            if won:
                self._held = nxt
                return
            # another run took number n + 1 first: look at it (it is alive: refuse)
        raise ConfigError(f"could not take the lock of {self.out!r}; other runs keep starting for it; try again")

    def release(self) -> None:
        """Mark the lock released (if this object holds it) and drop the staging root if
        nothing else is left in it. The file stays (marked) so its number is not reused
        by a run that raced for it; it goes with the staging root."""
        if self._held:
            try:
                holder = self._read(self._held) or {}
                if holder.get("token") == self.token:
                    self.fs.pipe_file(self._held, json.dumps(dict(holder, released=True)).encode())
            except OSError:
                pass
            self._held = None
        try:
            self.fs.invalidate_cache(self.staging_root)
            root = self.fs._strip_protocol(self.staging_root).rstrip("/")
            left = [
                p for p in self.fs.ls(self.staging_root, detail=False)
                # pyarrow's S3 writer leaves `folder/` marker objects, listed as the folder itself
                if p.rstrip("/") != root and not posixpath.basename(p.rstrip("/")).startswith((".probe", self.PREFIX))
            ]
            if not left:
                self.fs.rm(self.staging_root, recursive=True)
        except (FileNotFoundError, OSError):
            pass


def inputs_digest(shards) -> str:
    """A digest of the shard list: (id, paths, bytes, version) of `Shard`s or of `Plan.inputs`
    tuples (a file rewritten under the same name changes its content fingerprint)."""
    items = []
    for s in shards:
        if hasattr(s, "id"):
            items.append((s.id, tuple(s.paths), s.size, getattr(s, "version", "")) + ((list(s.span),) if getattr(s, "span", None) else ()))
        else:
            items.append((s[0], tuple(s[1]), s[2], s[3] if len(s) > 3 else ""))
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()


# ---------------------------------------------------------------------------- 1. check


def brief(result) -> dict:
    """The part of a `ShardResult` the check needs (no file lists): small per shard."""
    r = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    return {k: r.get(k) for k in ("shard", "read", "rows", "dead_letters", "model_fingerprint", "attempt")}


def committed_counts(layout: OutputLayout) -> dict | None:
    """The counts of the committed output if it is this run's (a commit run again after it
    succeeded), else None."""
    if not layout.is_complete():
        return None
    try:
        with layout.fs.open(f"{layout.out}/{layout.MANIFEST}", "r") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m.get("counts") if m.get("run_id") == layout.run_id else None


def _committed_manifest(layout: OutputLayout) -> dict | None:
    """The committed output's manifest, or None (no `_SUCCESS`, unreadable)."""
    if not layout.is_complete():
        return None
    try:
        layout.fs.invalidate_cache(layout.out)
        with layout.fs.open(f"{layout.out}/{layout.MANIFEST}", "r") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if "layerbeam_manifest" in m else None


def check_results(briefs: Sequence[Mapping], shards: Sequence, manifest_base: Mapping, run_id: str, planned_inputs: str | None = None, reused: Sequence[str] = ()) -> bool:
    """Refuse to publish anything unless every shard is there once and the run is consistent.

    Args:
        briefs: `brief(result)` of every shard result that reached the commit.
        shards: the shards the workers listed.
        planned_inputs: `inputs_digest` of the shards the launcher listed.
        reused: ids of the listed shards an incremental run takes from the latest version
            (no result of theirs is expected).

    Returns:
        True, or False when this run's output is already committed (nothing to do).

    Raises:
        CommitError: the input changed since the launcher listed it, a shard is missing or
            doubled, counts do not reconcile (`read = written + dead`), workers built
            different models, or the output appeared during the run. Nothing is published.
    """
    cfg = manifest_base["config"]
    layout = OutputLayout(cfg["output"]["path"], run_id)
    if committed_counts(layout) is not None:
        return False
    if planned_inputs is not None and inputs_digest(shards) != planned_inputs:
        raise CommitError(
            f"the files matching input.pattern {cfg['input']['pattern']!r} changed while the job ran "
            f"({len(shards)} shards now); nothing committed. Re-run when the input is stable (finished shards are kept only for the same input)"
        )
    expected = {s.id if hasattr(s, "id") else s[0] for s in shards} - set(reused)
    got = [r["shard"] for r in briefs]
    if sorted(got) != sorted(expected):
        counts = Counter(got)
        missing = sorted(expected - set(got))
        extra = sorted({g for g, n in counts.items() if n > 1} | (set(got) - expected))
        raise CommitError(f"shard results do not match the input: missing {missing}, unexpected or doubled {extra}; nothing committed")
    fps = {r["model_fingerprint"] for r in briefs}
    if briefs and fps != {manifest_base["model"]["fingerprint"]}:
        raise CommitError(f"workers built models with different weights {sorted(fps)}; set model.seed or use a weights file")
    for r in briefs:
        if r["read"] != r["rows"] + r["dead_letters"]:
            raise CommitError(f"shard {r['shard']}: read {r['read']} records but wrote {r['rows']} rows + {r['dead_letters']} dead letters; nothing committed")
    fs = layout.fs
    fs.invalidate_cache(layout.out)
    mine = fs.exists(layout.publishing_flag)  # a re-run of a commit that had started publishing
    if manifest_base.get("parent") is not None and not mine:
        # a run builds on the version it planned from: another run that committed
        # meanwhile (a schedule overlapping a manual run) makes this one stale
        now = _committed_manifest(layout)
        now_v = manifest_version(now) if now else None
        if now_v != manifest_base["parent"]:
            raise CommitError(
                f"output {layout.out!r} moved to version {now_v} while this run built on version {manifest_base['parent']}; nothing committed. "
                "Run the same command again: it starts from the new version"
            )
    elif not cfg["output"]["overwrite"] and not mine and fs.exists(layout.out) and fs.ls(layout.out):
        raise CommitError(f"output {layout.out!r} appeared during the run; nothing was replaced. Re-run with --overwrite to replace it")
    # from here on, files of this run may sit in <out> before _SUCCESS (object stores): a
    # re-run must recognise them as its own (`has_foreign_files`), not as someone else's
    fs.makedirs(layout.run_dir, exist_ok=True)
    fs.pipe_file(layout.publishing_flag, b"")
    return True


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


# ---------------------------------------------------------------------------- 2. dedupe


def bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket of each 128-bit key hash (`S16`): its first two bytes modulo `buckets`."""
    if len(hashes) == 0:
        return np.zeros(0, np.int64)
    raw = np.frombuffer(hashes.astype("S16").tobytes(), np.uint8).reshape(-1, 16)
    return ((raw[:, 0].astype(np.int64) << 8) | raw[:, 1]) % buckets


def key_parts(layout: OutputLayout, result, buckets: int = DEDUPE_BUCKETS) -> Iterable[tuple[int, tuple[str, np.ndarray, np.ndarray]]]:
    """One shard's key hashes split by bucket: `(bucket, (shard, hashes, record indices))`."""
    r = result.to_dict() if hasattr(result, "to_dict") else result
    if r.get("reused"):  # a shard taken from the latest version: its kept key hashes
        import io

        with layout.fs.open(f"{history_root(layout.out)}/{r['keys']}", "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            h, idx = z["hash"], z["index"]
    else:
        h, idx = layout.read_keys(r["shard"], r.get("attempt", ""))
    b = bucket_of(h, buckets)
    order = np.argsort(b, kind="stable")
    h, idx, b = h[order], idx[order], b[order]
    cuts = np.flatnonzero(np.diff(b)) + 1
    for hs, ix, bs in zip(np.split(h, cuts), np.split(idx, cuts), np.split(b, cuts)):
        if len(hs):
            yield int(bs[0]), (r["shard"], hs, ix)


def find_repeats(parts: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> list[tuple[str, list[tuple[bytes, int, str, int]]]]:
    """Within one bucket: the rows whose key an earlier (shard id, record index) wrote.

    Returns:
        `(shard, [(key hash, record index, first shard, first record index), …])` for each
        shard that loses rows; the earliest (shard, index) keeps the key.
    """
    parts = sorted(parts, key=lambda p: p[0])
    if len(parts) < 2:
        return []
    names = [p[0] for p in parts]
    h = np.concatenate([p[1] for p in parts])
    idx = np.concatenate([p[2] for p in parts])
    rank = np.concatenate([np.full(len(p[1]), i, np.int64) for i, p in enumerate(parts)])
    sort = np.lexsort((idx, rank, h))  # by hash, then shard order, then record index
    h, rank, idx = h[sort], rank[sort], idx[sort]
    later = np.concatenate([[False], h[1:] == h[:-1]])
    if not later.any():
        return []
    first = np.flatnonzero(~later)[np.cumsum(~later) - 1]
    out: dict[str, list] = {}
    for j in np.flatnonzero(later):
        f = first[j]
        out.setdefault(names[rank[j]], []).append((h[j].tobytes(), int(idx[j]), names[rank[f]], int(idx[f])))
    return sorted(out.items())


# ---------------------------------------------------------------------------- 3. publish


def final_names(results: Iterable, fmt: str, run_id: str) -> dict[str, dict[str, str]]:
    """shard → {staged path: committed path} of every data file whose format names files over
    the whole output (TFRecord's TFDS names `…-00000-of-00004` need the run's file count),
    in the order `finalize` lists them (by shard, then as written), so `publish_shard` copies
    each file to its final name once and `finalize`'s renaming finds nothing left to do (on
    object stores a rename there is a copy and a delete per file, on one worker). Small:
    one entry per file, like the manifest."""
    by_shard = sorted((r.to_dict() if hasattr(r, "to_dict") else r for r in results), key=lambda r: r["shard"])
    staged = [(r["shard"], f["path"]) for r in by_shard for f in r["files"]]
    names = final_paths(fmt, [p for _, p in staged], run_id)
    out: dict[str, dict[str, str]] = {}
    for (shard, old), new in zip(staged, names):
        if new != old:
            out.setdefault(shard, {})[old] = new
    return out


def publish_shard(layout: OutputLayout, result, repeats: Sequence[tuple[bytes, int, str, int]] = (), verify: bool = True, names: Mapping[str, str] | None = None) -> dict:
    """Put one shard's accepted attempt in place; return the shard's small summary.

    The accepted attempt is the one named by `result` (the `ShardResult` that reached the
    commit). Its files are checked against the result first; with `repeats`, they are
    rewritten without those rows (into `<attempt>.dedupe/`, deterministic names, so a
    crash part-way leaves nothing in the output and a re-run rewrites them). Then each file
    takes one operation: a rename into `<run>/final/` (local) or a server-side copy into
    `<out>/` (object stores), whose response is the check where the attempt reported the
    store's identity of the bytes (`content_id`). Other attempts' files of the shard are
    deleted here locally, and with the run's staging folder on object stores.

    `names`: the shard's `final_names` (staged path → committed path), where the format
    names files over the whole output.

    Raises:
        CommitError: a file of the accepted attempt is missing or differs from the result.
    """
    r = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    fs, shard, attempt = layout.fs, r["shard"], r.get("attempt", "")
    local = is_local(fs)
    src_dir = layout.shard_dir(shard, attempt)
    dest_root = f"{layout.run_dir}/final" if local else layout.out
    files = [dict(f, final_path=(names or {}).get(f["path"], f["final_path"])) for f in r["files"]]
    dead_src = layout.dead_file(shard, attempt)
    dead_name = f"{layout.DEAD_DIR}/{shard}-{layout.run_id[:8]}.parquet"
    dead_dst = f"{dest_root}/{dead_name}"
    dead_reasons = dict(r["dead_reasons"])
    dead = r["dead_letters"]
    # Object stores: a file whose attempt reported the store's identity of its bytes is
    # checked by its copy's response (no request of its own); the others (S3 multipart
    # ETags, which a copy does not keep; stores without one) by one listing of the attempt
    # (sizes) and a footer or last-record read each.
    pinned = {f["path"] for f in files if not local and verify and not repeats and f.get("content_id") and not multipart_id(f["content_id"])}
    if verify and (local or len(pinned) < len(files)):
        listed = _listing(fs, src_dir)
        if listed is not None:  # None: already moved away by an earlier try of this local commit
            for f in files:
                if f["path"] not in pinned:
                    _verify(fs, f"{src_dir}/{f['path']}", f, listed, shard)
    if repeats:
        gone = {h: {"key": None, "shard": _record_origin(r, i), "index": i, "stage": "dedupe",
                    "reason": "duplicate_key", "detail": f"the key was already written by record {fi} of shard {fs_}"}
                for h, i, fs_, fi in repeats}
        ddir = layout.dedupe_dir(shard, attempt)
        for f in files:  # the originals stay until _SUCCESS: a re-run rewrites them again
            dst = f"{ddir}/{f['path']}"
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            f["rows"] = rewrite_without(fs, f"{src_dir}/{f['path']}", dst, _keep_unless(gone))
            info = fs.info(dst)
            f["bytes"], f["content_id"] = int(info["size"]), content_id(fs, info)
            f.pop("last_record", None)  # written here, by the format's own writer
            if f["content_id"] and not multipart_id(f["content_id"]):
                pinned.add(f["path"])
        extra = pa.Table.from_pylist(sorted(gone.values(), key=lambda d: d["index"]), schema=DEAD_LETTER_SCHEMA)
        staged = read_parquet(fs, dead_src) if fs.exists(dead_src) else DEAD_LETTER_SCHEMA.empty_table()
        write_parquet_like(fs, None, f"{ddir}/_dead.parquet", pa.concat_tables([staged.cast(DEAD_LETTER_SCHEMA), extra]))
        src_dir, dead_src = ddir, f"{ddir}/_dead.parquet"
        dead += len(gone)
        dead_reasons["duplicate_key"] = dead_reasons.get("duplicate_key", 0) + len(gone)
    moves = [(f"{src_dir}/{f['path']}", f"{dest_root}/{f['final_path']}", f, f["path"] in pinned) for f in files]
    has_dead = bool(r["dead_letters"] or r.get("shard_errors") or repeats)
    if has_dead:
        moves.append((dead_src, dead_dst, None, False))
    if local:
        for src, dst, f, _ in moves:
            _put(fs, src, dst, f, local, shard)
    else:  # the shard's copies are independent requests: in flight together
        with ThreadPoolExecutor(min(8, len(moves)) or 1) as pool:
            list(pool.map(lambda m: _put(fs, m[0], m[1], m[2], local, shard, pinned=m[3]), moves))
    keys = _keep_keys(layout, shard, attempt)
    _drop_other_attempts(layout, shard, attempt)
    return {
        "keys": keys,
        "dedupe_lost": len(repeats),
        "lost_to": sorted({x[2] for x in repeats}),
        "shard": shard,
        "paths": list(r["paths"]),
        "span": list(r["span"]) if r.get("span") else None,
        "version": r.get("input_version", ""),
        "bytes_in": r["bytes_in"],
        "read": r["read"],
        "rows": sum(f["rows"] for f in files),
        "dead_letters": dead,
        "dead_reasons": dead_reasons,
        "shard_errors": [dict(e) for e in r.get("shard_errors", ())],
        "files": [{"path": f["final_path"], "rows": f["rows"], "bytes": f["bytes"]} for f in files],
        "dead_letter_file": dead_name if has_dead else None,
        "timing": r.get("timing"),
        "attempt": attempt,
        "stats": r.get("stats"),
    }


def _keep_keys(layout: OutputLayout, shard: str, attempt: str) -> str:
    """The accepted attempt's key hashes, relative to the history folder: the worker wrote
    them there (`OutputLayout.keys_file`), so keeping them costs no request."""
    return layout.keys_name(shard, attempt)


def reuse_shard(layout: OutputLayout, entry: Mapping, repeats: Sequence[tuple[bytes, int, str, int]], fmt: str) -> dict:
    """Carry one shard of the latest version into the new one; return its summary.

    `entry` is the shard's summary in the latest version (`plan`'s reuse list, with its id in
    the new listing). Its files stay where they are: on object stores nothing happens; locally
    each is hard-linked into `<run>/final/` (no byte copied). If the new version's
    duplicate-key check takes more of its keys than it lost before (a new shard earlier in
    shard order holds them), its files are rewritten without them, under new names (older
    versions keep the old files).
    """
    fs, shard = layout.fs, entry["shard"]
    local = is_local(fs)
    dest_root = f"{layout.run_dir}/final" if local else layout.out
    files = [dict(f) for f in entry["files"]]
    dead_name = entry.get("dead_letter_file")
    dead, reasons = entry["dead_letters"], dict(entry.get("dead_reasons") or {})
    if len(repeats) > int(entry.get("dedupe_lost") or 0):
        from .formats import _module
        from .staging import key_hashes

        old_dead = read_parquet(fs, f"{layout.out}/{dead_name}") if dead_name else DEAD_LETTER_SCHEMA.empty_table()
        old_dead = old_dead.cast(DEAD_LETTER_SCHEMA)
        had = {r["key"] for r in old_dead.to_pylist() if r["reason"] == "duplicate_key" and r["key"] is not None}
        had_h = set(key_hashes(sorted(had)).tolist()) if had else set()
        gone = {h: {"key": None, "shard": _record_origin(entry, i), "index": i, "stage": "dedupe",
                    "reason": "duplicate_key", "detail": f"the key was already written by record {fi} of shard {fs_}"}
                for h, i, fs_, fi in repeats if h not in had_h}
        tag = layout.run_id[:8]
        for f in files:
            head, tail = posixpath.split(f["path"])
            stem, dot, ext = tail.partition(".")
            new = posixpath.join(head, f"{stem}-r{tag}{dot}{ext}")
            dst = f"{dest_root}/{new}"
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            f["rows"] = _module(fmt).rewrite_without(fs, f"{layout.out}/{f['path']}", dst, _keep_unless(gone))
            f["bytes"] = fs.size(dst)
            f["path"] = new
        extra = pa.Table.from_pylist(sorted(gone.values(), key=lambda d: d["index"]), schema=DEAD_LETTER_SCHEMA)
        dead_name = f"{layout.DEAD_DIR}/{shard}-{tag}.parquet"
        fs.makedirs(posixpath.dirname(f"{dest_root}/{dead_name}"), exist_ok=True)
        write_parquet_like(fs, None, f"{dest_root}/{dead_name}", pa.concat_tables([old_dead, extra]))
        dead += len(gone)
        reasons["duplicate_key"] = reasons.get("duplicate_key", 0) + len(gone)
    elif local:
        for rel in [f["path"] for f in files] + ([dead_name] if dead_name else []):
            dst = f"{dest_root}/{rel}"
            if not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.link(f"{layout.out}/{rel}", dst)
    return {
        "shard": shard,
        "reused": True,
        "paths": list(entry["paths"]),
        **({"span": tuple(entry["span"])} if entry.get("span") else {}),  # an image shard: its folder and span
        "bytes_in": entry["bytes_in"],
        "version": entry.get("input_version", ""),
        "keys": entry["keys"],
        "dedupe_lost": len(repeats),
        "lost_to": sorted({x[2] for x in repeats}),
        "read": entry["read"],
        "rows": sum(f["rows"] for f in files),
        "dead_letters": dead,
        "dead_reasons": reasons,
        "shard_errors": [dict(e) for e in entry.get("shard_errors", ())],
        "files": [{"path": f["path"], "rows": f["rows"], "bytes": f["bytes"]} for f in files],
        "dead_letter_file": dead_name,
        "timing": entry.get("timing"),
        "stats": entry.get("stats"),
    }


def _listing(fs, folder: str) -> dict | None:
    """path (as `fs` names it) → size of the files under `folder`: one list request."""
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return None
    if not found:
        return None
    return {fs._strip_protocol(p): int(i.get("size") or 0) for p, i in found.items()}


def _verify(fs, path: str, f: Mapping, listed: Mapping, shard: str) -> None:
    """The staged file is what the attempt reported: its size, and a Parquet footer's row count."""
    size = listed.get(fs._strip_protocol(path))
    if size is None:
        return  # moved already (local re-run): checked when it was moved
    if size != f["bytes"]:
        raise CommitError(f"shard {shard}: {path} holds {size} bytes but its attempt reported {f['bytes']}; it was not committed. Delete the shard's marker and re-run")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with fs.open(path, "rb", size=size) if not is_local(fs) else open(path, "rb") as fh:
                rows = pq.read_metadata(fh).num_rows
        except Exception as e:  # noqa: BLE001 (any footer error means a damaged file)
            raise CommitError(f"shard {shard}: {path} is not a readable Parquet file ({e}); it was not committed. Delete the shard's marker and re-run") from None
        if rows != f["rows"]:
            raise CommitError(f"shard {shard}: {path} holds {rows} rows but its attempt reported {f['rows']}; it was not committed. Delete the shard's marker and re-run")
    elif path.endswith(".tfrecord") and is_local(fs):
        n = framed_records(path)
        if n != f["rows"]:
            held = f"{n} well-framed records" if n >= 0 else "records whose framing does not end at the file's end (cut inside a record, or bytes after the last)"
            raise CommitError(f"shard {shard}: {path} holds {held} but its attempt reported {f['rows']}; it was not committed. Delete the shard's marker and re-run")
    elif path.endswith(".tfrecord") and f.get("last_record") is not None:
        # one 12-byte range read: the last record's header must frame a record ending at the
        # file's end (a truncated or padded file fails; a full scan would move the data here)
        at = int(f["last_record"])
        why = check_last_record(fs.cat_file(path, start=at, end=at + 12) if at + 12 <= size else b"", at, size)
        if why:
            raise CommitError(f"shard {shard}: {path} is not the TFRecord file its attempt wrote ({why}); it was not committed. Delete the shard's marker and re-run")


def _put(fs, src: str, dst: str, f: Mapping | None, local: bool, shard: str, pinned: bool = False) -> None:
    """One operation per file: a rename (local) or a server-side copy (object stores).

    `pinned`: the copy's response must show the bytes the attempt reported (`content_id`);
    if not, the copy is deleted again and nothing of the shard counts."""
    if local:
        if os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        elif not os.path.exists(dst):
            raise CommitError(f"shard {shard}: staged file {src} is missing and was not moved to {dst}; delete the shard's marker and re-run")
        elif f is not None and os.path.getsize(dst) != f["bytes"]:
            raise CommitError(f"shard {shard}: {dst} holds {os.path.getsize(dst)} bytes, not the {f['bytes']} reported; delete the shard's marker and re-run")
        return
    try:
        got = _server_copy(fs, src, dst, f["bytes"] if f else None)
    except FileNotFoundError:
        raise CommitError(f"shard {shard}: staged file {src} is missing; delete the shard's marker and re-run") from None
    if pinned and got is None:  # a copy whose response names no identity (e.g. s3fs's managed copy of a ≥ 5 GB file)
        got = content_id(fs, fs.info(dst))
    if pinned and got != f["content_id"]:
        try:
            fs.rm_file(dst)
        except FileNotFoundError:
            pass
        raise CommitError(
            f"shard {shard}: {src} is not the file its attempt wrote (the store identifies its bytes as {got}, the attempt reported {f['content_id']}); "
            "it was not committed. Delete the shard's marker and re-run"
        )


def _server_copy(fs, src: str, dst: str, size: int | None) -> str | None:
    """One server-side copy request (S3 CopyObject for files under 5 GB, whose size the
    result gave: s3fs's `cp_file` would first ask the size again; GCS rewriteTo, repeated
    only if the server asks to continue); returns the copy's `content_id` from the response."""
    from fsspec.asyn import sync

    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if {"s3", "s3a"} & set(protos) and size is not None and size < 5 << 30:
        (b1, k1, _), (b2, k2, _) = fs.split_path(src), fs.split_path(dst)
        # s3fs's own call: its retries, and NoSuchKey raised as FileNotFoundError
        out = sync(fs.loop, fs._call_s3, "copy_object", Bucket=b2, Key=k2, CopySource={"Bucket": b1, "Key": k1})
        fs.invalidate_cache(dst)
        return content_id(fs, out.get("CopyObjectResult"))
    if {"gs", "gcs"} & set(protos):
        (b1, k1, _), (b2, k2, _) = fs.split_path(src), fs.split_path(dst)
        out, token = {}, None
        while out.get("done") is not True:
            out = sync(fs.loop, fs._call, "POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", b1, k1, b2, k2, headers={"Content-Type": "application/json"}, json_out=True, rewriteToken=token)
            token = out.get("rewriteToken")
        fs.invalidate_cache(dst)
        return content_id(fs, out.get("resource"))
    fs.cp_file(src, dst)
    return None


def _drop_other_attempts(layout: OutputLayout, shard: str, attempt: str) -> None:
    """Delete the files of the shard's attempts that were not accepted (retries, zombies),
    on a local disk. On object stores they go with the run's staging folder after
    `_SUCCESS`, in batched deletes (`cleanup_run`), instead of a listing per shard here: they
    live under the staging folder, never under `<out>`, so no reader sees them."""
    if not is_local(layout.fs):
        return
    try:
        entries = layout.fs.ls(layout.shard_dir(shard), detail=False)
    except FileNotFoundError:
        return
    keep = {attempt, f"{attempt}.dedupe"}
    stale = [p for p in entries if posixpath.basename(p.rstrip("/")) not in keep]
    for p in stale:
        try:
            layout.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass


def _keep_unless(gone: dict[bytes, dict]):
    """keys → mask of rows to keep: False for rows whose key hash is in `gone` (whose
    dead-letter rows get the key filled in)."""
    from .staging import key_hashes

    def keep(keys) -> np.ndarray:
        hashes = key_hashes(keys)
        for k, h in zip(keys, hashes.tolist()):
            if h in gone:
                gone[h]["key"] = k.decode() if isinstance(k, bytes) else k
        return ~np.isin(hashes, np.array(list(gone), dtype=hashes.dtype))

    return keep


def _record_origin(r: Mapping, i: int) -> str:
    """The file record `i` of a shard result came from, for its dead letter: the record's own
    file where each is one (an image shard's names are not in its result: its folder and span)."""
    if r.get("span"):
        prefix, first, last, _ = r["span"]
        return f"{prefix}/{first} … {last} (record {i})"
    return r["paths"][0] if len(r["paths"]) == 1 else r["paths"][i]


def _input_entry(s: Mapping) -> dict:
    """A shard's manifest `inputs` entry: its files, or for an image shard its span
    (`prefix`, `first`, `last`, `count`: no per-image list), bytes, version and counts."""
    where = {"paths": s["paths"]}
    if s.get("span"):
        prefix, first, last, count = s["span"]
        where = {"prefix": prefix, "first": first, "last": last, "count": count}
    # with what an incremental run needs to reuse the shard: its dead letters, its key hashes
    # (kept beside the output), and what the duplicate-key check took from it and for whom
    return {"shard": s["shard"], **where, "bytes": s["bytes_in"], "version": s.get("version", ""), "records": s["read"], "rows": s["rows"],
            "dead_letters": s["dead_letters"], "dead_reasons": s.get("dead_reasons") or {}, "dead_letter_file": s.get("dead_letter_file"),
            "keys": s.get("keys"), "dedupe_lost": s.get("dedupe_lost", 0), "lost_to": s.get("lost_to", []), "reused": bool(s.get("reused")),
            "stats": s.get("stats"), "timing": s.get("timing")}


# ---------------------------------------------------------------------------- 4. finalize


def finalize(layout: OutputLayout, summaries: Sequence[Mapping], manifest_base: Mapping) -> dict:
    """Write the manifest and `_SUCCESS` (and, locally, rename the folder into place).

    Takes only the shards' small summaries; no data file is read or moved here. Returns the
    counts. Run again after it succeeded, it returns the committed counts.
    """
    done = committed_counts(layout)
    if done is not None:
        _drop_replaced(layout)
        _retire_old(layout)
        return done
    prev = _committed_manifest(layout)
    cfg = manifest_base["config"]
    summaries = sorted(summaries, key=lambda s: s["shard"])
    read = sum(s["read"] for s in summaries)
    rows = sum(s["rows"] for s in summaries)
    dead = sum(s["dead_letters"] for s in summaries)
    if read != rows + dead:
        raise CommitError(f"read {read} records but wrote {rows} rows + {dead} dead letters; nothing committed")
    reasons: Counter = Counter()
    for s in summaries:
        reasons.update(s["dead_reasons"])
    manifest = dict(manifest_base)
    manifest.update(
        {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "counts": {"records_read": read, "rows_written": rows, "dead_letters": dead, "dead_letter_reasons": dict(sorted(reasons.items()))},
            "shard_errors": [dict(e, shard=s["shard"], records_kept=s["read"]) for s in summaries for e in s["shard_errors"]],
            "inputs": [_input_entry(s) for s in summaries],
            "files": [{"path": f["path"], "rows": f["rows"], "bytes": f["bytes"], "shard": s["shard"]} for s in summaries for f in s["files"]],
            "dead_letter_files": [s["dead_letter_file"] for s in summaries if s.get("dead_letter_file")],
            "partition_by": cfg["output"]["partition_by"],
            "format": cfg["output"]["format"],
        }
    )
    check_outcome(dict(manifest["counts"], shard_errors=manifest["shard_errors"]), cfg["output"].get("max_dead_letter_fraction"), cfg["output"].get("allow_empty", False))
    manifest["statistics"] = merge_results(summaries)  # the shards' partial statistics, merged
    # the version: one more than the committed one; the lineage (the version a chain of
    # incremental builds started from) goes on unless this run rebuilt everything
    pv = manifest_version(prev) if prev else None
    version = (pv or 0) + 1
    incremental = prev is not None and manifest_base.get("parent") == pv and not cfg["output"].get("overwrite")
    manifest.update({"version": version, "parent": pv, "lineage": prev.get("lineage", pv) if incremental else version})
    fs = layout.fs
    local = is_local(fs)
    final = f"{layout.run_dir}/final" if local else layout.out
    _apply_final_names(fs, final, manifest, manifest_base.get("run_id", layout.run_id), keep=set() if local or not prev else set(paths_of(prev, layout.out)))
    extra = sidecars(manifest["format"], manifest)  # e.g. TFDS's dataset_info.json
    # a big output's file and input lists go to Parquet sidecars (`versions.spill`)
    extra.update(spill(manifest, manifest_base.get("run_id", layout.run_id)))
    # compact: a reader loads the manifest whole (~100 B per file instead of ~480 with indent=2)
    data = json.dumps(manifest, separators=(",", ":")).encode()
    # every version's manifest is kept beside the output (before the switch: a reader that
    # finds version N in <out> finds it in the history too)
    if prev is not None and not fs.exists(version_path(layout.out, pv)):  # written before versions existed
        _put_bytes(fs, version_path(layout.out, pv), json.dumps(prev, separators=(",", ":")).encode())
    _put_bytes(fs, version_path(layout.out, version), data)
    if local:
        os.makedirs(final, exist_ok=True)
        for name, content in extra.items():
            _write_local(f"{final}/{name}", content)
        _write_local(f"{final}/{layout.MANIFEST}", data)
        _write_local(f"{final}/{layout.SUCCESS}", b"")
        old = f"{layout.run_dir}/old"
        if os.path.exists(layout.out):
            if os.path.exists(old):  # an earlier try renamed an output aside already
                import shutil

                shutil.rmtree(old)
            os.rename(layout.out, old)
        os.rename(final, layout.out)
        _retire_old(layout)
        return manifest["counts"]
    # object stores: keep the old manifest's file list in staging, so the old files can be
    # deleted once the new manifest is in place (also by a re-run after a crash)
    replaced = f"{layout.run_dir}/_replaced.json"
    if layout.is_complete() and not fs.exists(replaced):
        try:
            with fs.open(f"{layout.out}/{layout.MANIFEST}", "r") as f:
                old = json.load(f)
            old_files = sorted(referenced(old, layout.out))
        except (OSError, ValueError):
            old_files = []
        fs.pipe_file(replaced, json.dumps(old_files).encode())
    for name, content in extra.items():
        fs.pipe_file(f"{layout.out}/{name}", content)
    fs.pipe_file(f"{layout.out}/{layout.MANIFEST}", data)  # one PUT: readers switch here
    fs.pipe_file(f"{layout.out}/{layout.SUCCESS}", b"")
    _drop_replaced(layout)
    return manifest["counts"]


def _put_bytes(fs, path: str, data: bytes) -> None:
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_local(path, data)
    else:
        fs.pipe_file(path, data)


def _apply_final_names(fs, root: str, manifest: dict, run_id: str, keep: set = frozenset()) -> None:
    """Give the data files the names their format wants over the whole output (TFDS shard
    names `…tfrecord-00000-of-00004` for TFRecord, which need the run's file count), and
    update the manifest's file list. A name already in place is skipped, so a finalize run
    again after a crash finishes the renames. Locally these are renames inside the run's
    folder; on object stores one more server-side move per TFRecord file (Parquet files
    keep their names and cost nothing here). A file in `keep` (an object store's file that
    the previous version lists, reused by an incremental run) is copied instead of moved:
    the previous version still reads it under its old name until it moves to the history."""
    staged = [f["path"] for f in manifest["files"]]
    names = final_paths(manifest["format"], staged, run_id)
    for f, new in zip(manifest["files"], names):
        old = f["path"]
        if new == old:
            continue
        src, dst = f"{root}/{old}", f"{root}/{new}"
        if fs.exists(src) and not fs.exists(dst):
            if old in keep:
                _server_copy(fs, src, dst, f.get("bytes"))
            else:
                fs.mv(src, dst)
        f["path"] = new


def _write_local(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _retire_old(layout: OutputLayout) -> None:
    """Local: move the files of the replaced version (renamed aside to `<run>/old`) that the
    new version does not list into the history folder (one rename each; reused files are hard
    links of the new version's and just go), then drop the rest of the old folder. Run again
    after a crash, it finishes the job."""
    import shutil

    old = f"{layout.run_dir}/old"
    if not is_local(layout.fs) or not os.path.exists(old):
        return
    try:
        with open(f"{old}/{layout.MANIFEST}") as f:
            before = json.load(f)
        with open(f"{layout.out}/{layout.MANIFEST}") as f:
            now = json.load(f)
    except (OSError, ValueError):
        before = now = None
    if before and now:
        hist = history_root(layout.out)
        for rel in sorted(referenced(before, old) - referenced(now, layout.out)):
            src = f"{old}/{rel}"
            if os.path.exists(src):
                os.makedirs(os.path.dirname(f"{hist}/{rel}"), exist_ok=True)
                os.replace(src, f"{hist}/{rel}")
    shutil.rmtree(old)


def _drop_replaced(layout: OutputLayout) -> None:
    """Move the replaced version's files that the new manifest does not list into the
    history folder (object stores: one server-side copy each, then batched deletes)."""
    fs = layout.fs
    replaced = f"{layout.run_dir}/_replaced.json"
    if is_local(fs) or not fs.exists(replaced):
        return
    with fs.open(replaced, "r") as f:
        old = set(json.load(f))
    with fs.open(f"{layout.out}/{layout.MANIFEST}", "r") as f:
        m = json.load(f)
    keep = referenced(m, layout.out)
    gone = sorted(old - keep)
    hist = history_root(layout.out)

    def retire(rel: str) -> str | None:
        try:
            _server_copy(fs, f"{layout.out}/{rel}", f"{hist}/{rel}", None)
        except FileNotFoundError:  # retired by an earlier try
            return None
        return f"{layout.out}/{rel}"

    with ThreadPoolExecutor(16) as pool:
        moved = [p for p in pool.map(retire, gone) if p]
    if moved:
        try:
            fs.rm(moved)  # batched: S3 deletes up to 1000 keys per request
        except FileNotFoundError:
            pass
    fs.rm(replaced)


# ---------------------------------------------------------------------------- 5. cleanup


def cleanup_shard(layout: OutputLayout, shard: str) -> None:
    """Delete a shard's staged files and marker after `_SUCCESS` (idempotent), on a local
    disk. On object stores `cleanup_run` deletes the whole staging folder in batched requests
    (S3: 1,000 keys a request, GCS: 100) rather than a listing and deletes per shard."""
    if not is_local(layout.fs) or not layout.is_complete():
        return
    for p in (layout.shard_dir(shard), layout.marker(shard)):
        try:
            layout.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass


def cleanup_run(layout: OutputLayout) -> None:
    """Delete what is left of the run's staging folder after `_SUCCESS` (idempotent)."""
    if not layout.is_complete():
        return
    try:
        layout.fs.rm(layout.run_dir, recursive=True)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- in one process


def commit_run(results: list, shards: list, manifest_base: Mapping, run_id: str, planned_inputs: str | None = None, threads: int = 16, reuse: Sequence[Mapping] = ()) -> dict:
    """Check, dedupe, publish and finalize in this process; return the committed counts.

    The Beam-free commit (`layerbeam.extract(..., output=...)`, `WriteLayers`, tests). The
    steps are the ones the Beam job distributes (`beam.CommitShards`); here the shards are
    published by a thread pool and the key buckets are sorted one at a time (memory: ~24
    bytes per row for the hashes, plus ~100 bytes per row of the largest bucket).

    Args:
        results: the `ShardResult`s (or their dicts) the runner accepted, one per shard.
        shards: the shards the workers listed.
        manifest_base: the manifest's run-level part (`layerbeam.plan.manifest_base`).
        planned_inputs: `inputs_digest` of the shards the launcher listed.
        reuse: shards taken from the latest version (an incremental run; see `reuse_shard`).

    Raises:
        CommitError: see `check_results` and `publish_shard`; nothing is committed then.
    """
    results = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results]
    layout = OutputLayout(manifest_base["config"]["output"]["path"], run_id)
    reuse = [dict(e, reused=True) for e in reuse]
    if not check_results([brief(r) for r in results], shards, manifest_base, run_id, planned_inputs, [e["shard"] for e in reuse]):
        counts = finalize(layout, [], manifest_base)  # committed already: finish its cleanup only
        cleanup_run(layout)
        return counts
    buckets: dict[int, list] = {}
    repeats: dict[str, list] = {}
    fmt = manifest_base["config"]["output"]["format"]
    # the committed names over the whole new version: reused shards' files count too
    names = final_names([*results, *reuse], fmt, run_id)
    work = [*results, *reuse]

    def one(r):
        if r.get("reused"):
            return reuse_shard(layout, r, repeats.get(r["shard"], ()), fmt)
        return publish_shard(layout, r, repeats.get(r["shard"], ()), names=names.get(r["shard"]))

    with ThreadPoolExecutor(max(1, min(threads, len(work)))) as pool:
        # one GET per shard, in flight together (on an object store, in sequence they would
        # take a round trip each)
        for parts in pool.map(lambda r: list(key_parts(layout, r, DEDUPE_BUCKETS)), work):
            for b, part in parts:
                buckets.setdefault(b, []).append(part)
        for b in sorted(buckets):
            for shard, rows in find_repeats(buckets.pop(b)):
                repeats.setdefault(shard, []).extend(rows)
        summaries = list(pool.map(one, work))
    counts = finalize(layout, summaries, manifest_base)
    cleanup_run(layout)
    return counts


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


def versions() -> dict[str, str]:
    """Versions of the packages that made an output, for its manifest."""
    out = {}
    for pkg in ("layerbeam", "tensorflow", "keras", "apache-beam", "pyarrow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
