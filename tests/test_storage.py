"""avsa.storage against the local filesystem and a real S3 HTTP endpoint (moto server)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import threading
import time
import uuid

import boto3
import pyarrow.fs as pafs
import pytest
from s3server import CuttingProxy, MotoS3Server

from avsa import storage
from avsa.errors import ConfigError, StorageError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_server():
    server = MotoS3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
                 "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    return s3_server.url


@pytest.fixture
def bucket(s3_env):
    name = f"avsa-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Dropper:
    """An endpoint that accepts every connection and closes it at once, counting them."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_join_keeps_scheme():
    assert storage.join("s3://b/root/", "a/", "/c.bin") == "s3://b/root/a/c.bin"
    assert storage.join("file:///tmp/x", "y") == "file:///tmp/x/y"
    assert storage.join("/tmp/x", "y", "z") == "/tmp/x/y/z"
    assert storage.split_s3("s3://b/k/e/y") == ("b", "k/e/y")
    with pytest.raises(StorageError, match="s3:///key"):
        storage.split_s3("s3:///key")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_round_trip(tmp_path, scheme):
    root = f"{scheme}{tmp_path}/out"
    uri = storage.join(root, "a", "b", "blob.bin")
    storage.write_bytes(uri, b"\x00payload\xff")
    storage.write_bytes(storage.join(root, "top.txt"), b"t")
    assert storage.read_bytes(uri) == b"\x00payload\xff"
    assert storage.size(uri) == 9
    assert storage.exists(uri) and storage.exists(root)
    assert storage.list_prefix(root) == [storage.join(root, "a/b/blob.bin"),
                                         storage.join(root, "top.txt")]
    with storage.open_input_stream(uri) as f:
        assert f.read(3) == b"\x00pa"
    assert sorted(p.name for p in (tmp_path / "out" / "a" / "b").iterdir()) == ["blob.bin"]
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(StorageError, match=f"{uri}: no such file"):
        storage.read_bytes(uri)
    assert storage.list_prefix(storage.join(root, "missing")) == []


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_names_with_uri_characters_round_trip(tmp_path, scheme):
    """'#', '?', '%' and spaces are data in a file name: under file:// a listed or joined URI
    reads back the file it names (they used to be cut off as a fragment or query, or decoded
    twice), and writes land where the names say."""
    root = f"{scheme}{tmp_path}"
    names = ["take#2/clip.bin", "q?x=1.bin", "a%20b.bin", "with space.bin"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file()) == sorted(names)
    listed = storage.list_prefix(root)
    assert sorted(listed) == sorted(storage.join(root, n) for n in names)
    assert sorted(storage.read_bytes(u) for u in listed) == sorted(n.encode() for n in names)


def test_local_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    storage.write_bytes(target, b"old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match=f"{target}: Input/output error"):
        storage.write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_local_pyarrow_filesystem(tmp_path):
    fs, path = storage.pyarrow_filesystem(f"file://{tmp_path}/dest")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/dest"


def test_s3_round_trip_exists_size_delete(bucket):
    uri = f"s3://{bucket}/shards/0001.tar"
    data = bytes(range(256)) * 40
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.size(uri) == len(data)
    assert storage.exists(uri)
    assert storage.exists(f"s3://{bucket}/shards")
    assert not storage.exists(f"s3://{bucket}/shards/0002.tar")
    assert not storage.exists(f"s3://{bucket}/shard")
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)


def test_s3_list_prefix_recursive_sorted(bucket):
    for key in ["run/b.txt", "run/a/z.bin", "run/a/c.bin", "run-other/x", "top"]:
        storage.write_bytes(f"s3://{bucket}/{key}", key.encode())
    expected = [f"s3://{bucket}/run/{k}" for k in ("a/c.bin", "a/z.bin", "b.txt")]
    assert storage.list_prefix(f"s3://{bucket}/run") == expected
    assert storage.list_prefix(f"s3://{bucket}/run/") == expected
    assert len(storage.list_prefix(f"s3://{bucket}")) == 5
    assert storage.list_prefix(f"s3://{bucket}/nothing") == []


def test_s3_list_prefix_paginates(bucket):
    for i in reversed(range(7)):
        storage.write_bytes(f"s3://{bucket}/many/{i:03d}", b"")
    listed = storage.list_prefix(f"s3://{bucket}/many", page_size=2)
    assert listed == [f"s3://{bucket}/many/{i:03d}" for i in range(7)]


@pytest.mark.parametrize("where", ["file", "s3"])
def test_copy_tree_keeps_relative_paths(where, tmp_path, request):
    root = (f"file://{tmp_path}/dest" if where == "file"
            else f"s3://{request.getfixturevalue('bucket')}/checkpoints/epoch_1")
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"m" * 1000)
    (src / "nested" / "meta.json").write_bytes(b"{}")
    assert storage.copy_tree(src, root) == [f"{root}/model.pt", f"{root}/nested/meta.json"]
    assert storage.read_bytes(f"{root}/model.pt") == b"m" * 1000
    with pytest.raises(StorageError, match="no such file to upload"):
        storage.upload_file(tmp_path / "absent", f"{root}/absent")


def test_s3_input_stream_reads_front_to_back(bucket):
    uri = f"s3://{bucket}/stream.bin"
    data = os.urandom(300_000)
    storage.write_bytes(uri, data)
    with storage.open_input_stream(uri, buffer_size=4096) as f:
        assert f.read(10) == data[:10]
        assert f.read(100_000) == data[10:100_010]
        assert f.read(1) == data[100_010:100_011]
        assert f.read() == data[100_011:]
        assert f.read(5) == b""


def test_s3_bodies_cut_short_are_read_again(bucket, s3_server, monkeypatch):
    """A reply cut mid-body (a real TCP cut, not a patched client): s3transfer reads the whole
    object again, pyarrow's ranged GET is retried by the AWS SDK."""
    uri = f"s3://{bucket}/resume.bin"
    data = os.urandom(200_000)
    storage.write_bytes(uri, data)
    proxy = CuttingProxy(s3_server.port, after=20_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        assert storage.read_bytes(uri) == data
        assert proxy.cut == 1
        proxy.cuts = 2
        with storage.open_input_stream(uri, buffer_size=65_536) as f:
            assert f.read(1000) == data[:1000]
            assert f.read() == data[1000:]
        assert proxy.cut == 2
    finally:
        proxy.close()


@pytest.mark.parametrize(("name", "value"), [("AWS_MAX_ATTEMPTS", "soon"),
                                             ("AWS_MAX_ATTEMPTS", "0"),
                                             ("AWS_RETRY_MODE", "sometimes")])
def test_bad_retry_setting_is_a_config_error(s3_env, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    for op in (storage.read_bytes, storage.open_input_stream):
        with pytest.raises(ConfigError, match=f"^{name}: .*{value}"):
            op("s3://b/k")


def test_retry_settings_reach_both_libraries(s3_env, monkeypatch):
    client = storage.S3Settings.from_env().boto3_client()
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 12}
    assert (client.meta.config.connect_timeout, client.meta.config.read_timeout) == (5, 60)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    s3 = storage.S3Settings.from_env()
    assert (s3.retry_mode, s3.max_attempts, s3.stream_max_attempts) == ("adaptive", 4, 4)
    assert s3.boto3_client().meta.config.retries == {"mode": "adaptive", "total_max_attempts": 4}


@pytest.mark.parametrize("section", ["endpoint_url = {url}",
                                     "services = local\n[services local]\ns3 =\n  endpoint_url = {url}"])
def test_endpoint_in_the_aws_config_file_reaches_both_libraries(bucket, s3_env, monkeypatch,
                                                                tmp_path, section):
    """boto3 reads endpoint_url from the config file; pyarrow (streamed reads, Ray's storage)
    does not, and used to go to AWS itself while listings went to the configured endpoint."""
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\n{section.format(url=s3_env)}\n")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    uri = f"s3://{bucket}/cfg/blob.bin"
    storage.write_bytes(uri, b"configured")
    assert storage.list_prefix(f"s3://{bucket}/cfg") == [uri]
    with storage.open_input_stream(uri) as f:
        assert f.read() == b"configured"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.S3Settings.from_env().endpoint is None


def test_s3_missing_bucket(s3_env):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/key.bin"
    for op in (storage.read_bytes, storage.size, storage.list_prefix, storage.exists,
               storage.open_input_stream):
        with pytest.raises(StorageError, match="does not exist") as info:
            op(uri)
        assert uri in str(info.value) and "\n" not in str(info.value)


def test_s3_missing_key(bucket, tmp_path):
    uri = f"s3://{bucket}/absent/key.bin"
    for op in (storage.read_bytes, storage.size, storage.open_input_stream):
        with pytest.raises(StorageError, match="object not found") as info:
            op(uri)
        assert str(info.value) == f"{uri}: object not found"


def test_s3_missing_credentials(bucket, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = f"s3://{bucket}/k"
    with pytest.raises(StorageError, match="no AWS credentials") as info:
        storage.read_bytes(uri)
    assert str(info.value).startswith(f"{uri}: ")


@pytest.mark.parametrize("op", [storage.read_bytes, storage.open_input_stream])
def test_s3_endpoint_down_fails_within_retry_budget(s3_env, monkeypatch, op):
    """3 attempts wait at most 0.15 s (botocore) or 3 s (pyarrow) between them."""
    down = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", down)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    uri = "s3://any-bucket/key"
    start = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as info:
        op(uri)
    elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed
    assert str(info.value).startswith(f"{uri}: {down} unreachable after ")
    assert str(info.value).endswith("at most 3 attempts)") and "\n" not in str(info.value)


@pytest.mark.parametrize("op", [storage.read_bytes, storage.open_input_stream])
def test_s3_endpoint_dropping_connections_is_retried_then_named(s3_env, monkeypatch, op):
    dropper = _Dropper()
    monkeypatch.setenv("AWS_ENDPOINT_URL", dropper.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    uri = "s3://any-bucket/key"
    try:
        with pytest.raises(StorageError, match=f"^{uri}: {dropper.url} unreachable after "):
            op(uri)
        assert dropper.accepted == 4  # every attempt the settings allow, and no more
    finally:
        dropper.sock.close()


def test_s3_read_survives_endpoint_restart(bucket, monkeypatch):
    uri = f"s3://{bucket}/survivor.bin"
    storage.write_bytes(uri, b"still here")
    # A second endpoint over the same moto backend: stopped now, back on the same port in 1 s.
    flaky = MotoS3Server().start()
    flaky.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
    restart = threading.Timer(1.0, flaky.start)
    restart.start()
    try:
        start = time.monotonic()
        assert storage.read_bytes(uri) == b"still here"
        assert time.monotonic() - start >= 0.9
    finally:
        restart.join()
        flaky.stop()


def test_s3_stream_survives_endpoint_restart(bucket, monkeypatch):
    uri = f"s3://{bucket}/streamed.bin"
    data = os.urandom(100_000)
    storage.write_bytes(uri, data)
    flaky = MotoS3Server().start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
    try:
        with storage.open_input_stream(uri, buffer_size=16_384) as f:
            assert f.read(1000) == data[:1000]
            flaky.stop()
            restart = threading.Timer(1.0, flaky.start)
            restart.start()
            start = time.monotonic()
            assert f.read() == data[1000:]
            assert time.monotonic() - start >= 0.9
            restart.join()
    finally:
        flaky.stop()


def test_pyarrow_filesystem_reads_boto3_objects(bucket, s3_env):
    boto3.client("s3", endpoint_url=s3_env).put_object(
        Bucket=bucket, Key="ray/run/file.txt", Body=b"written by boto3")
    fs, path = storage.pyarrow_filesystem(f"s3://{bucket}/ray/")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/ray"
    with fs.open_input_stream(f"{path}/run/file.txt") as f:
        assert f.read() == b"written by boto3"
    with fs.open_output_stream(f"{path}/run/back.txt") as f:
        f.write(b"written by pyarrow")
    assert storage.read_bytes(f"s3://{bucket}/ray/run/back.txt") == b"written by pyarrow"


def _read_in_child(uri: str) -> bytes:
    return storage.read_bytes(uri)


def test_settings_pickle_and_work_in_another_process(bucket):
    uri = f"s3://{bucket}/p.bin"
    storage.write_bytes(uri, b"pickled")
    s3 = storage.S3Settings.from_env()
    clone = pickle.loads(pickle.dumps(s3))
    assert clone == s3 and clone.endpoint is not None
    assert clone.boto3_client().get_object(Bucket=bucket, Key="p.bin")["Body"].read() \
        == b"pickled"
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_read_in_child, (uri,)) == b"pickled"
