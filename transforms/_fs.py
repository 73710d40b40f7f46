"""The one set of file-system helpers: fsspec and Arrow file systems for any path or URL,
which paths TensorFlow reads itself, and local copies of the files it cannot read."""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile

import pyarrow as pa

from .errors import ConfigError

__all__ = ["fsspec_fs", "arrow_fs", "is_local", "tf_readable", "LocalBridge", "require_filesystem", "local_copy"]

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
    try:
        return pafs.FileSystem.from_uri(url)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
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
