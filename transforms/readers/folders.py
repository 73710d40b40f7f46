"""Image folders at scale: listed per directory inside the pipeline, shards described compactly.

An `images` input may hold 10⁹ files. No step on one machine lists them all or holds a
per-image list: the launcher finds the *prefixes* (the directories to list, or the
subtrees to walk for a `**` pattern) and lists a bounded sample of them for its
estimate; the pipeline lists each prefix on its own worker (`list_prefix`) and cuts each
directory's sorted file names into shards of `files_per_shard`. A shard is described by
its span, `(prefix, first name, last name, count)`, its bytes and the version digest of
its files' content fingerprints, never by its paths: the worker that reads it lists its
directory again (one list call) and takes the names from first to last (`resolve`),
checking the count and the version, so a file added, removed or rewritten in place since
the listing is refused instead of read silently.

Shards are cut per directory, so adding files in a new directory (a daily folder) adds
shards and leaves every other shard's span, id and version as they were: a resumed run
(and an incremental build) finds them done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator

from .._fs import _protocols, fsspec_fs
from ..errors import ConfigError

__all__ = ["Prefix", "Survey", "plan_prefixes", "list_prefix", "resolve", "survey", "shard_id", "InputChangedError"]

GLOB_CHARS = "*?["


class InputChangedError(ConfigError):
    """The files of a shard changed between the pipeline's listing and the read."""


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A directory to list: its own files only, or (`recursive`) every directory below it too."""

    url: str
    recursive: bool = False


def _split(pattern: str):
    """(fs, stripped pattern with a folder turned into `folder/**`, regex of the files it matches, URL maker)."""
    from fsspec.utils import glob_translate

    fs, path = fsspec_fs(pattern)
    if not any(c in path for c in GLOB_CHARS) and fs.isdir(path):
        path = path.rstrip("/") + "/**"
    local = bool(_protocols(fs) & {"file", "local"})
    url = (lambda p: p) if local else fs.unstrip_protocol
    return fs, path, re.compile(glob_translate(path)), url, local


# A `**` walk is spread over at least this many subtrees where the tree allows: each
# subtree is walked by one worker, so `root/train/<1000 labels>` must not be one subtree.
MIN_SUBTREES = 64
# ... found by listing at most this many folders (breadth first) on the planning machine.
MAX_PLANNING_LISTINGS = 256


def plan_prefixes(pattern: str) -> list[Prefix]:
    """The prefixes to list for `pattern`, sorted; what the launcher (and the pipeline's first
    step) computes. Lists folders only down to the first glob part: for `root/*/*.jpg` the
    folders `root/*`; for `root/**` (or a bare folder) `root` itself and each folder in it as
    a subtree, split breadth first into their subfolders until there are `MIN_SUBTREES`
    subtrees (or the tree has no more folders, or `MAX_PLANNING_LISTINGS` folders were
    listed). A folder listed here is listed once; its files are never kept.

    Shard ids and spans depend on the folders, not on how they are grouped into prefixes,
    so a plan that splits differently (a new top folder) cuts the same shards."""
    fs, path, _, url, _ = _split(pattern)
    parts = path.split("/")
    if not any("**" in p for p in parts):
        return sorted({Prefix(url(d), False) for d in _dirs(fs, "/".join(parts[:-1]) or "/")}, key=lambda p: p.url)
    k = next(i for i, p in enumerate(parts) if "**" in p)
    flat: list[str] = []  # folders whose own files only are listed
    subtrees = _dirs(fs, "/".join(parts[:k]))
    listings = 0
    # breadth first: replace a subtree by its folder (own files) and its subfolders' subtrees
    while subtrees and len(subtrees) < MIN_SUBTREES and listings < MAX_PLANNING_LISTINGS:
        level = []
        for d in subtrees:
            if listings >= MAX_PLANNING_LISTINGS:
                level.append(d)
                continue
            listings += 1
            flat.append(d)
            level.extend(_subdirs(fs, d))
        subtrees = level
    out = {Prefix(url(d), False) for d in flat} | {Prefix(url(d), True) for d in subtrees}
    return sorted(out, key=lambda p: (p.url, p.recursive))


def _dirs(fs, pattern: str) -> list[str]:
    """The folders a folder pattern names (itself when it has no glob part)."""
    if not any(c in pattern for c in GLOB_CHARS):
        return [pattern.rstrip("/") or "/"] if fs.isdir(pattern) else []
    found = fs.glob(pattern, detail=True)
    return [p.rstrip("/") for p, i in found.items() if i.get("type") == "directory"]


def _subdirs(fs, path: str) -> list[str]:
    return [d for d, _ in _entries(fs, path)[1]]


def _entries(fs, path: str):
    """([(name, size, content tag)] of the files directly in `path`, [(subfolder path, None)]).

    One listing of the folder. Locally `os.scandir`, whose entries carry the stat the
    content tag needs (no second call per file); elsewhere `fs.ls(detail=True)`, whose
    listing already has the store's fingerprints (GCS generation/crc32c, S3 ETag), with the
    client's listing cache dropped after (s3fs and gcsfs would otherwise keep ~1 KB per file).
    """
    files, dirs = [], []
    if _protocols(fs) & {"file", "local"}:
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return files, dirs
        with it:
            for e in it:
                if e.is_dir():
                    dirs.append((f"{path.rstrip('/')}/{e.name}", None))
                elif e.is_file():
                    st = e.stat()
                    files.append((e.name, st.st_size, f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"))
        return files, dirs
    from . import _content_tag

    try:
        listed = fs.ls(path, detail=True)
    except FileNotFoundError:
        return files, dirs
    finally:
        fs.invalidate_cache(path)
    base = path.rstrip("/")
    for info in listed:
        name = info["name"].rstrip("/")
        if name == base:  # some stores list the folder's own marker object
            continue
        if info.get("type") == "directory":
            dirs.append((name, None))
        else:
            files.append((posixpath.basename(name), int(info.get("size") or 0), _content_tag(fs, name, info)))
    return files, dirs


def _matching(fs, regex, folder: str):
    """(sorted [(name, size, tag)] of the files in `folder` the pattern matches, subfolders)."""
    files, dirs = _entries(fs, folder)
    base = folder.rstrip("/")
    return sorted(f for f in files if regex.match(f"{base}/{f[0]}")), [d for d, _ in dirs]


def shard_id(prefix_url: str, k: int) -> str:
    """A shard's id: its folder's digest and its chunk number there. Stable while the folder
    is unchanged, whatever other folders come and go (64 bits: no two of 10⁶ folders share one)."""
    return f"i{hashlib.blake2b(prefix_url.encode('utf-8', 'surrogateescape'), digest_size=8).hexdigest()}-{k:05d}"


def _version(tags) -> str:
    from . import _version as v

    return v(tags)


def _shards_of_folder(url: str, files, files_per_shard: int):
    from . import Shard

    for k in range(0, len(files), files_per_shard):
        chunk = files[k : k + files_per_shard]
        yield Shard(
            shard_id(url, k // files_per_shard), (), sum(s for _, s, _ in chunk), _version([t for _, _, t in chunk]),
            span=(url, chunk[0][0], chunk[-1][0], len(chunk)),
        )


def list_prefix(pattern: str, prefix: Prefix, files_per_shard: int) -> Iterator:
    """The compact `Shard`s of one prefix: per folder (every folder below it if recursive),
    its matching files in name order cut into groups of `files_per_shard`. Runs on a worker;
    holds one folder's listing at a time."""
    fs, _, regex, url, _ = _split(pattern)
    _, start = fsspec_fs(prefix.url)
    stack = [start.rstrip("/") or "/"]
    while stack:
        folder = stack.pop()
        files, dirs = _matching(fs, regex, folder)
        yield from _shards_of_folder(url(folder), files, files_per_shard)
        if prefix.recursive:
            stack.extend(sorted(dirs, reverse=True))


def resolve(shard, pattern: str):
    """The shard with its file paths, from one listing of its folder: the names from its first
    to its last. Raises `InputChangedError` (one line) when they are not the `count` files of
    the shard's `version` any more (a file added, removed or rewritten since the listing)."""
    if shard.span is None or shard.paths:
        return shard
    prefix, first, last, count = shard.span
    fs, _, regex, _, _ = _split(pattern)
    _, folder = fsspec_fs(prefix)
    files, _ = _matching(fs, regex, folder)
    chunk = [f for f in files if first <= f[0] <= last]
    if len(chunk) != count or _version([t for _, _, t in chunk]) != shard.version:
        what = f"{len(chunk)} files now, {count} when listed" if len(chunk) != count else "a file was rewritten (its size, time or generation changed)"
        raise InputChangedError(
            f"the images of shard {shard.id} ({prefix}/{first} … {last}) changed since the run listed them ({what}); "
            "re-run when the input is stable: finished shards are kept, changed ones are read again"
        )
    base = prefix.rstrip("/")
    return dataclasses.replace(shard, paths=tuple(f"{base}/{n}" for n, _, _ in chunk))


def match(pattern: str, files_per_shard: int) -> list:
    """Every compact shard of `pattern`, listed here (the small-input path, and tests)."""
    out = []
    for p in plan_prefixes(pattern):
        out.extend(list_prefix(pattern, p, files_per_shard))
    return sorted(out, key=sort_key)


def sort_key(shard) -> tuple:
    """Path order of compact shards: folder, then first name."""
    return (shard.span[0], shard.span[1]) if shard.span else (shard.paths[0] if shard.paths else "", "")


@dataclasses.dataclass(frozen=True)
class Survey:
    """What the launcher knows of an image input before the pipeline lists it.

    Attributes:
        prefixes: the prefixes the pipeline will list.
        listed: how many of them the launcher listed (all: the figures below are exact).
        files, bytes, shards: counted over the listed prefixes and scaled to all of them.
        examples: `files` with `max_examples_per_shard` applied per shard.
        first: a shard of the listed ones (for checks), or None if they held no file.
    """

    prefixes: tuple
    listed: int
    files: int
    bytes: int
    shards: int
    examples: int
    first: object = None

    @property
    def complete(self) -> bool:
        return self.listed == len(self.prefixes)


def survey(pattern: str, files_per_shard: int, cap: int | None = None, max_prefixes: int = 64, max_files: int = 100_000) -> Survey:
    """Plan the prefixes and list a bounded, evenly spread sample of them (all when there are
    at most `max_prefixes`, stopping early once `max_files` files were seen), keeping only
    counts: never a per-image list, whatever the input's size."""
    prefixes = tuple(plan_prefixes(pattern))
    n = len(prefixes)
    order = list(range(n)) if n <= max_prefixes else sorted({round(i * (n - 1) / (max_prefixes - 1)) for i in range(max_prefixes)})
    # a sample of empty prefixes says nothing: then the others, in order, until a file shows
    sampled = set(order)
    order += [i for i in range(n) if i not in sampled]
    files = size = shards = examples = listed = 0
    first = None
    for k, i in enumerate(order):
        if k >= max_prefixes and files:
            break
        for s in list_prefix(pattern, prefixes[i], files_per_shard):
            c = s.span[3]
            files, size, shards, examples = files + c, size + s.size, shards + 1, examples + (min(c, cap) if cap else c)
            if first is None:
                first = s
        listed += 1
        if files >= max_files and listed < n:
            break
    scale = n / listed if listed else 0
    return Survey(prefixes, listed, round(files * scale), round(size * scale), round(shards * scale), round(examples * scale), first)
