"""The one set of file-system helpers: fsspec and Arrow file systems for any path or URL,
which paths TensorFlow reads itself, local copies of the files it cannot read, an atomic
create-if-absent (`create_exclusive`) and the store's free content fingerprint of a file.

`create_exclusive(fs, path, data)` is the primitive the output lock needs: of any number of
concurrent callers for one path, exactly one gets True, and the file then holds that
caller's bytes, complete.

- local: the bytes are written to a private temporary file, which is then hard-linked to
  `path`; `link()` fails with EEXIST if `path` exists, so readers never see a half-written
  file. File systems without hard links fall back to `O_CREAT|O_EXCL`.
- S3 (s3fs): `fs.pipe_file(path, data, mode="create")`, i.e. `PutObject` with
  `If-None-Match: *`; 412 PreconditionFailed becomes `FileExistsError`. AWS may answer 409
  ConditionalRequestConflict while another conditional write is in flight (s3fs raises
  `OSError(EBUSY)`): retried.
- GCS (gcsfs): `fs.pipe_file(path, data, mode="create")`, i.e. an upload with
  `ifGenerationMatch=0`; 412 becomes `FileExistsError`.

A client that retries a create whose first try landed gets 412 on its retry; the object is
then read back and the call reports True when it holds exactly `data`, so `data` must be
unique per caller (a lock's content is: uuid, pid, host). Not `fs.open(path, "xb")` on s3fs:
an empty write goes through `touch()` without `If-None-Match` and overwrites. The generic
fsspec `pipe_file(mode="create")` of other file systems is exists-then-write: refused.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping

import pyarrow as pa

from .errors import ConfigError

__all__ = ["fsspec_fs", "arrow_fs", "is_local", "tf_readable", "LocalBridge", "require_filesystem", "local_copy", "create_exclusive", "fingerprint", "atomic_create_supported"]

# Schemes TensorFlow's own file systems read; anything else goes through an fsspec bridge.
_TF_SCHEMES = ("gs://", "ram://")


def fsspec_fs(url: str):
    """(fsspec file system, path in it) for a local path or URL."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def arrow_fs(url: str):
    """(pyarrow FileSystem, path in it) for a local path or any URL pyarrow or fsspec knows."""
    from pyarrow import fs as pafs

    if "://" not in url:
        return pafs.LocalFileSystem(), url
    if url.startswith("file://"):
        return pafs.LocalFileSystem(), url[len("file://"):]
    # gs:// goes through gcsfs, like every other gs:// access here: Arrow's own GCS client
    # takes neither gcsfs's credentials nor STORAGE_EMULATOR_HOST, and retries a refused
    # upload for minutes instead of failing
    if not url.startswith(("gs://", "gcs://")):
        try:
            return pafs.FileSystem.from_uri(url)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            pass
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def tf_readable(path: str) -> bool:
    return "://" not in path or path.startswith(_TF_SCHEMES)


class LocalBridge:
    """Copies files TensorFlow cannot read (memory://, s3://, …) to a local temp folder."""

    def __init__(self, paths: tuple[str, ...]):
        self.dir = None
        self.paths = []
        for p in paths:
            if tf_readable(p) or p.startswith("file://"):
                self.paths.append(p[len("file://"):] if p.startswith("file://") else p)
                continue
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="layerbeam-bridge-")
            local = os.path.join(self.dir, f"{len(self.paths):06d}-{posixpath.basename(p)}")
            fs, fp = fsspec_fs(p)
            fs.get(fp, local)
            self.paths.append(local)

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def require_filesystem(what: str, url: str) -> None:
    """A URL whose file system package is missing is a one-line error, not a traceback."""
    import fsspec

    try:
        fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        extra = {"gs": "gcp", "gcs": "gcp", "s3": "s3"}.get(scheme)
        fix = f"pip install 'layerbeam[{extra}]'" if extra else "install the fsspec implementation for it"
        raise ConfigError(f"{what} {url!r} needs a file system package for {scheme}:// that is not installed ({e}); {fix}") from None
    except ValueError as e:
        raise ConfigError(f"{what} {url!r} is not a path fsspec understands: {e}") from None


def local_copy(src: str) -> str:
    if "://" not in src:
        return src
    import os
    import tempfile

    import fsspec

    local = os.path.join(tempfile.mkdtemp(prefix="layerbeam-model-"), os.path.basename(src))
    fsspec.open(src).fs.get(src, local)
    return local


_ATOMIC_CREATE = {"s3", "s3a", "gs", "gcs"}


def _protocols(fs) -> set[str]:
    p = fs.protocol
    return set(p if isinstance(p, (tuple, list)) else (p,))


def _local_create(path: str, data: bytes) -> bool:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:  # no hard links here: exclusive create, then write (briefly visible empty)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        os.unlink(tmp)


def create_exclusive(fs, path: str, data: bytes, *, attempts: int = 5) -> bool:
    """Create `path` holding `data` if nothing is there; True if this call created it.

    Atomic on local disks, S3 and GCS; `data` should be unique to the caller (see module doc).
    Raises `NotImplementedError` on file systems without an atomic create.
    """
    protos = _protocols(fs)
    if protos & {"file", "local"}:
        path = fs._strip_protocol(path)
        if _local_create(path, data):
            return True
        try:
            with open(path, "rb") as f:
                return f.read() == data
        except FileNotFoundError:
            return False
    if not protos & _ATOMIC_CREATE:
        raise NotImplementedError(f"no atomic create-if-absent on {sorted(protos)} file systems")
    path = fs._strip_protocol(path)
    for k in range(attempts):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            break
        except OSError as e:  # S3 409 ConditionalRequestConflict: another conditional write in flight
            if e.errno != errno.EBUSY or k == attempts - 1:
                raise
            time.sleep(0.05 * 2**k)
    try:  # our own earlier try may have landed before the client retried
        fs.invalidate_cache(path)
        return fs.cat_file(path) == data
    except FileNotFoundError:  # created and deleted since: someone else's turn came and went
        return False


def fingerprint(fs, path: str) -> dict:
    """What the store tells for free about a file's content version, from one `info()`.

    - GCS: `generation` (changes on every write, even with the same bytes), `crc32c`, `size`.
    - S3: `ETag` (MD5 of the bytes for a single PUT; `<md5 of part md5s>-<parts>` for a
      multipart upload: equal content written with another part size has another ETag),
      `size`, and `VersionId` on versioned buckets.
    - local: `mtime` (ns), `ino`, `size` (`os.stat`).
    """
    protos = _protocols(fs)
    if protos & {"file", "local"}:
        st = os.stat(fs._strip_protocol(path))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    info = fs.info(path)
    out = {"size": int(info["size"])}
    if protos & {"gs", "gcs"}:
        out["generation"] = str(info.get("generation", ""))
        out["crc32c"] = info.get("crc32c")
    elif protos & {"s3", "s3a"}:
        out["etag"] = (info.get("ETag") or "").strip('"')
        if info.get("VersionId"):
            out["version_id"] = info["VersionId"]
    else:
        out.update({k: str(info[k]) for k in ("mtime", "created", "LastModified", "etag") if k in info})
    return out


def atomic_create_supported(fs) -> bool:
    """Whether `create_exclusive` is atomic on this file system."""
    return bool(_protocols(fs) & (_ATOMIC_CREATE | {"file", "local"}))


def content_id(fs, info: Mapping | None) -> str | None:
    """A store's identity of an object's bytes, from a listing entry, `info()` or a server-side
    copy's response; None where the store gives none (local disk, memory://).

    - S3: the ETag (the MD5 of the bytes for a single PUT, and kept by CopyObject; a multipart
      upload's `<md5 of part md5s>-<parts>` is not kept by a copy: see `multipart_id`).
    - GCS: crc32c and size (kept by rewriteTo; the generation is not).
    """
    if not info:
        return None
    protos = _protocols(fs)
    if protos & {"s3", "s3a"}:
        etag = (info.get("ETag") or info.get("etag") or "").strip('"')
        return f"etag:{etag}" if etag else None
    if protos & {"gs", "gcs"}:
        crc = info.get("crc32c")
        return f"crc32c:{crc}:{int(info['size'])}" if crc and info.get("size") is not None else None
    return None


def multipart_id(cid: str | None) -> bool:
    """An S3 multipart upload's ETag: a CopyObject does not keep it, so the copy's response
    cannot be compared with it."""
    return bool(cid) and cid.startswith("etag:") and "-" in cid
