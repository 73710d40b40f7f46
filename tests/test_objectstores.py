"""The object-store fixtures work with the real clients, and the atomic create holds under races.

Servers: moto (S3) and fake-gcs-server (GCS), started by tests/objectstores.py.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.objectstores import gcs_server, gcs_store, local_store, race_create, s3_server, s3_store, store  # noqa: F401
from layerbeam.transforms._fs import create_exclusive, fingerprint
from scripts._request_counter import count_requests


def test_write_list_read_delete(store):
    fs, p = store.fs, store.path
    fs.makedirs(f"{p}/a", exist_ok=True)
    fs.pipe(f"{p}/a/x.bin", b"hello")
    fs.pipe(f"{p}/a/y.bin", os.urandom(3 * 2**20))
    assert sorted(f.rsplit("/", 1)[-1] for f in fs.ls(f"{p}/a")) == ["x.bin", "y.bin"]
    assert fs.cat(f"{p}/a/x.bin") == b"hello"
    assert fs.size(f"{p}/a/y.bin") == 3 * 2**20
    fs.rm(f"{p}/a/x.bin")
    assert not fs.exists(f"{p}/a/x.bin")
    assert [f.rsplit("/", 1)[-1] for f in fs.find(p)] == ["y.bin"]


def test_mv_and_copy(store):
    fs, p = store.fs, store.path
    fs.makedirs(f"{p}/src", exist_ok=True)
    fs.pipe(f"{p}/src/one", b"1")
    fs.makedirs(f"{p}/dst", exist_ok=True)
    fs.copy(f"{p}/src/one", f"{p}/dst/copy")
    fs.mv(f"{p}/src/one", f"{p}/dst/moved")
    assert not fs.exists(f"{p}/src/one")
    assert fs.cat(f"{p}/dst/copy") == fs.cat(f"{p}/dst/moved") == b"1"


def _table() -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(100)], "v": np.arange(100, dtype=np.float32)})


def test_pyarrow_s3_reads_parquet(s3_store, s3_server):
    from pyarrow import fs as pafs

    with s3_store.fs.open(f"{s3_store.path}/t.parquet", "wb") as f:
        pq.write_table(_table(), f)
    s3 = pafs.S3FileSystem(endpoint_override=s3_server.endpoint, scheme="http", access_key="testing", secret_key="testing", region="us-east-1")
    assert pq.read_table(f"{s3_store.path}/t.parquet", filesystem=s3).equals(_table())
    fs, path = pafs.FileSystem.from_uri(f"{s3_store.url}/t.parquet")  # AWS_ENDPOINT_URL from the env
    assert pq.read_table(path, filesystem=fs).equals(_table())
    # and written by pyarrow, read by s3fs
    pq.write_table(_table(), f"{s3_store.path}/w.parquet", filesystem=s3)
    with s3_store.fs.open(f"{s3_store.path}/w.parquet", "rb") as f:
        assert pq.read_table(f).equals(_table())


def test_pyarrow_gcs_reads_parquet_through_fsspec(gcs_store):
    from pyarrow import fs as pafs

    with gcs_store.fs.open(f"{gcs_store.path}/t.parquet", "wb") as f:
        pq.write_table(_table(), f)
    gcs = pafs.PyFileSystem(pafs.FSSpecHandler(gcs_store.fs))
    assert pq.read_table(f"{gcs_store.path}/t.parquet", filesystem=gcs).equals(_table())
    assert pq.ParquetDataset(gcs_store.path, filesystem=gcs).read().equals(_table())


def test_create_exclusive_once(store):
    p = f"{store.path}/locks/lock"
    assert create_exclusive(store.fs, p, b"first")
    assert not create_exclusive(store.fs, p, b"second")
    assert store.fs.cat(p) == b"first"
    # a retried create of our own bytes (the first try landed) counts as ours
    assert create_exclusive(store.fs, p, b"first")


def test_create_exclusive_raw_server_calls(s3_server, gcs_server):
    """The server calls underneath, with the vendors' own clients: If-None-Match: * and ifGenerationMatch=0."""
    import uuid

    boto3 = pytest.importorskip("boto3")
    from botocore.exceptions import ClientError

    key = f"raw/{uuid.uuid4().hex}"
    c = boto3.client("s3", endpoint_url=s3_server.endpoint)
    c.put_object(Bucket=s3_server.bucket, Key=key, Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=s3_server.bucket, Key=key, Body=b"2", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert c.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"1"

    storage = pytest.importorskip("google.cloud.storage")
    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials

    client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_server.endpoint})
    blob = client.bucket(gcs_server.bucket).blob(key)
    blob.upload_from_string(b"1", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        client.bucket(gcs_server.bucket).blob(key).upload_from_string(b"2", if_generation_match=0)
    assert blob.download_as_bytes() == b"1"


@pytest.mark.parametrize("callers", [100])
def test_create_exclusive_race_threads(store, callers):
    """`callers` threads (sharing 5 clients: an s3fs client takes ~0.4 s to build) race to create one path: exactly one wins."""
    p = f"{store.path}/race/lock"
    proto = {"s3": "s3", "gcs": "gs", "local": "file"}[store.name]
    with count_requests() as c:
        results = race_create((proto, p, callers, "t", 5))
    winners = [d for ok, d in results if ok]
    assert len(winners) == 1, f"{len(winners)} winners"
    assert store.fs.cat(p) == winners[0]
    if store.name != "local":
        assert c.peak_concurrency > 1, c.summary()  # the server really saw them together


@pytest.mark.slow
def test_create_exclusive_race_processes(store):
    """200 callers: 8 processes × 25 threads, each thread with its own client: exactly one wins."""
    p = f"{store.path}/race/lock"
    proto = {"s3": "s3", "gcs": "gs", "local": "file"}[store.name]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = [r for rs in pool.map(race_create, [(proto, p, 25, f"p{k}", 25) for k in range(8)]) for r in rs]
    winners = [d for ok, d in results if ok]
    assert len(results) == 200 and len(winners) == 1, f"{len(winners)} winners"
    assert store.fs.cat(p) == winners[0]


def test_fingerprint_sees_a_same_size_rewrite(store):
    p = f"{store.path}/in/file.bin"
    store.fs.makedirs(f"{store.path}/in", exist_ok=True)
    store.fs.pipe(p, b"a" * 100)
    before = fingerprint(store.fs, p)
    store.fs.pipe(p, b"b" * 100)
    after = fingerprint(store.fs, p)
    assert before["size"] == after["size"] == 100
    assert before != after, (before, after)
    keys = {"local": {"mtime_ns", "ino"}, "s3": {"etag"}, "gcs": {"generation", "crc32c"}}[store.name]
    assert keys <= set(after)


def test_request_counter_counts_each_request(s3_store, gcs_store):
    for st in (s3_store, gcs_store):
        with count_requests(store=st.name) as c:
            st.fs.pipe_file(f"{st.path}/x", b"1")
            st.fs.invalidate_cache()
            assert st.fs.cat_file(f"{st.path}/x") == b"1"
        # s3fs: PUT, HEAD (cat_file asks the size), GET; gcsfs: upload, GET
        assert c.by_kind == ({"put": 1, "head": 1, "get": 1} if st.name == "s3" else {"upload": 1, "get": 1}), c.summary()
        assert c.bytes_up >= 1
