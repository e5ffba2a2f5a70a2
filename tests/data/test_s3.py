"""Shards on object storage over the real S3 protocol: a local moto server, the shards uploaded with boto3, streamed
back by StreamingImageDataModule (litdata) into training, under the cache limit, under DDP, and through outages.

Nothing here reaches the network: the server listens on 127.0.0.1, the credentials are fake, ~/.aws and the instance
metadata service are switched off.
"""
import csv
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from tiny_imagefolder import NAMES, WNIDS, make_image_folder

from lwta_vision.cli import cli_main
from lwta_vision.cli import main as train_main
from lwta_vision.data import StreamingImageDataModule
from lwta_vision.data.shards import convert_image_folder
from lwta_vision.data.streaming import ObjectStoreError

litdata = pytest.importorskip("litdata")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ["--config", str(ROOT / "configs" / "imagenet_resnet50.yaml"), "--config", str(ROOT / "configs" / "act" / "lwta_u2.yaml"),
          "--config", str(ROOT / "configs" / "data" / "imagenet_streaming.yaml")]
BUCKET = "shards"
TINY_MODEL = ["--model.init_args.model", "convnet_small", "--model.init_args.model_kwargs",
              '{"widths": [8, 16]}']
# a failing request fails at once: one attempt, short timeouts (the defaults are streaming.S3_CLIENT_CONFIG)
FAST_FAIL = {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 0, "mode": "standard"}}


# ------------------------------------------------------------------------------------------------ the S3 server
@pytest.fixture(scope="module", autouse=True)
def _offline_aws(tmp_path_factory):
    """Fake credentials and region; no profile, config file, instance metadata or proxy; litdata scratch in tmp."""
    scratch = tmp_path_factory.mktemp("aws")
    had_allow_http = "AWS_ALLOW_HTTP" in os.environ
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                     "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "MAX_CACHE_SIZE", "LITDATA_CACHE_DIR"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(scratch / "no-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "no-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("NO_PROXY", "no_proxy"):  # boto3 and obstore both honour HTTP(S)_PROXY: not for 127.0.0.1
            mp.setenv(name, "127.0.0.1,localhost")
        mp.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(scratch / "chunks"))
        mp.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(scratch / "data"))
        yield
    if not had_allow_http:  # set by the DataModule for the http:// endpoints below
        os.environ.pop("AWS_ALLOW_HTTP", None)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port) with one bucket; stopped after the module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield SimpleNamespace(endpoint=endpoint, client=client)
    server.stop()


def _upload(client, folder: Path, prefix: str) -> str:
    """Copy ``folder`` (train/ and val/ shards) to ``s3://BUCKET/prefix/`` with the same layout; returns that URL."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def _options(endpoint: str, **config) -> dict:
    return {"endpoint_url": endpoint, "config": {**FAST_FAIL, **config}}


@pytest.fixture(scope="module")
def tiny(s3, tmp_path_factory):
    """``(local shards, their URL)``: 3 classes, 12 train and 9 val images, ~4 images per shard file."""
    src = make_image_folder(tmp_path_factory.mktemp("folder"), per_split=(("train", 4), ("val", 3)))
    dst = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        convert_image_folder(str(src), str(dst), split, num_workers=2, chunk_bytes="20KB", start_method="fork")
    return dst, _upload(s3.client, dst, "tiny")


def _digests(loader) -> list[str]:
    """One digest per image of a loader's batches (the transforms are deterministic with augment=False)."""
    return [hashlib.sha256(x.numpy().tobytes()).hexdigest() for xb, _ in loader for x in xb]


def _datamodule(data_dir, **kwargs) -> StreamingImageDataModule:
    args = dict(image_size=16, batch_size=4, num_workers=0, augment=False)
    return StreamingImageDataModule(str(data_dir), **{**args, **kwargs})


# ------------------------------------------------------------------------------------------------ reading, training
def test_s3_shards_read_as_the_local_folder(tiny, s3, tmp_path):
    local, url = tiny
    remote = _datamodule(url, storage_options=_options(s3.endpoint), cache_dir=str(tmp_path / "cache"))
    here = _datamodule(local)
    assert remote.class_names == here.class_names == list(NAMES) and remote.folder_names == list(WNIDS)
    remote.setup()
    here.setup()
    assert Counter(_digests(remote.train_dataloader())) == Counter(_digests(here.train_dataloader()))
    assert _digests(remote.val_dataloader()) == _digests(here.val_dataloader())  # stored order, every image
    assert list((tmp_path / "cache").rglob("chunk-*.bin"))  # the chunks streamed for training were cached there


def test_missing_shards_on_s3_name_the_url_and_the_fix(tiny, s3):
    local, _ = tiny
    s3.client.upload_file(str(local / "train" / "classes.json"), BUCKET, "no-index/train/classes.json")
    s3.client.upload_file(str(local / "val" / "classes.json"), BUCKET, "no-index/val/classes.json")
    for url, missing in ((f"s3://{BUCKET}/nothing", "classes.json"), ("s3://no-such-bucket/shards", "classes.json"),
                         (f"s3://{BUCKET}/no-index", "index.json")):
        dm = _datamodule(url, storage_options=_options(s3.endpoint))
        with pytest.raises(FileNotFoundError) as err:
            dm.setup()
        msg = str(err.value)
        assert url in msg and missing in msg and "python -m lwta_vision.data.shards" in msg, msg
        assert msg.count("python -m lwta_vision.data.shards") == 1 and f"aws s3 sync /path/to/shards {url}" in msg
        assert not isinstance(err.value, ObjectStoreError)


def test_train_one_epoch_from_s3_through_the_cli(tiny, s3, tmp_path):
    _, url = tiny
    runs = str(tmp_path / "runs")
    cli = cli_main([
        "fit", *CONFIG, *TINY_MODEL,
        "--data.init_args.data_dir", url, "--data.init_args.storage_options", json.dumps(_options(s3.endpoint)),
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.max_cache_size", "1MB",
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1",
        "--data.init_args.pin_memory", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.precision", "32-true", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", runs,
        "--trainer.logger.init_args.save_dir", runs, "--trainer.logger.init_args.name", "s3"])
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 1 and cli.trainer.global_step == 3
    assert cli.model.class_names == list(NAMES)
    rows = list(csv.DictReader(open(next(Path(runs).glob("s3/version_*/metrics.csv")))))
    assert [float(r["val/acc"]) for r in rows if r.get("val/acc")]  # one validation, logged


# ------------------------------------------------------------------------------------------------ the cache limit
@pytest.fixture(scope="module")
def big(s3, tmp_path_factory):
    """``(local shards, URL, chunk sizes)``: 81 noise PNGs of ~270 KB in train, ~3 MB shard files (about 8)."""
    src = tmp_path_factory.mktemp("big-folder")
    rng = np.random.default_rng(1)
    for wnid in WNIDS:
        (src / "train" / wnid).mkdir(parents=True)
        for i in range(27):
            Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(src / "train" / wnid / f"{i}.png")
    dst = tmp_path_factory.mktemp("big-shards")
    convert_image_folder(str(src), str(dst), "train", num_workers=2, chunk_bytes="3MB", start_method="fork")
    shutil.copytree(dst / "train", dst / "val")  # setup() needs a val split; the train shards stand in for it
    sizes = [p.stat().st_size for p in (dst / "train").glob("chunk-*.bin")]
    return dst, _upload(s3.client, dst, "big"), sizes


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # deleted while we looked
                pass
    return total


class _PeakSize:
    """Polls a folder's size every few milliseconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _folder_bytes(self.folder))
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _folder_bytes(self.folder))


# 12MB: litdata's shared slot budget (used from 10 MiB up, as with a real 100GB cache); 5MB: its plain size check
@pytest.mark.parametrize("max_cache_size, limit, num_workers", [("12MB", 12_000_000, 2), ("5MB", 5_000_000, 0)])
def test_cache_stays_within_max_cache_size_and_every_image_is_seen(big, s3, tmp_path, max_cache_size, limit,
                                                                    num_workers):
    local, url, chunk_sizes = big
    # the split does not fit: chunks must be evicted and fetched again
    assert sum(chunk_sizes) > limit + 2 * max(chunk_sizes)
    cache = tmp_path / "cache"
    here = _datamodule(local)
    here.setup()
    expected = Counter(_digests(here.train_dataloader()))
    assert len(expected) == 81
    dm = _datamodule(url, storage_options=_options(s3.endpoint), cache_dir=str(cache),
                     max_cache_size=max_cache_size, num_workers=num_workers, batch_size=8)
    dm.setup()
    with _PeakSize(cache) as size:
        for _ in range(2):  # every image once per epoch, the second epoch fetching evicted chunks again
            assert Counter(_digests(dm.train_dataloader())) == expected
    assert size.peak <= limit + max(chunk_sizes), (size.peak, limit)
    assert _folder_bytes(cache) <= limit


# ------------------------------------------------------------------------------------------------ DDP
class ValImageCounter(Callback):
    """Test-only: after each validation epoch (not the sanity check) rank 0 appends to ``out`` one JSON line, the
    digests of the images every rank validated, gathered from all ranks.

    Passed to train.py as ``--trainer.callbacks+={"class_path": "test_s3.ValImageCounter", ...}``.
    """

    def __init__(self, out: str):
        self.out, self.digests = out, []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.digests = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.digests += [hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest() for x in batch[0]]

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        ranks = [self.digests]
        if trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, self.digests)
        if trainer.is_global_zero:
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, "ranks": ranks}) + "\n")


def test_ddp_two_processes_count_every_val_image_once(tiny, s3, tmp_path):
    """train.py under DDP (2 CPU processes) streams from S3; each validation sees the 9 val images once, split
    over both ranks (4 + 5: no padding, no image twice), and logs val/acc."""
    local, url = tiny
    here = _datamodule(local, image_size=32)
    here.setup()
    expected = Counter(_digests(here.val_dataloader()))
    assert len(expected) == 9
    runs, counts = str(tmp_path / "runs"), tmp_path / "val_images.jsonl"
    counter = {"class_path": "test_s3.ValImageCounter", "init_args": {"out": str(counts)}}
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", *CONFIG, *TINY_MODEL,
           "--data.init_args.data_dir", url, "--data.init_args.storage_options", json.dumps(_options(s3.endpoint)),
           "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.image_size", "32",
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1", "--data.init_args.pin_memory",
           "false", "--data.init_args.augment", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           f"--trainer.callbacks+={json.dumps(counter)}", "--trainer.default_root_dir", runs,
           "--trainer.logger.init_args.save_dir", runs, "--trainer.logger.init_args.name", "ddp"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent)]))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = [json.loads(line) for line in counts.read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0]
    for e in epochs:
        assert sorted(len(r) for r in e["ranks"]) == [4, 5]
        assert Counter(d for r in e["ranks"] for d in r) == expected
    rows = list(csv.DictReader(open(next(Path(runs).glob("ddp/version_*/metrics.csv")))))
    assert len([r for r in rows if r.get("val/acc")]) == 1


# ------------------------------------------------------------------------------------------------ outages
def test_client_options_for_litdata(monkeypatch):
    """The boto3 client litdata builds for s3:// gets bounded retries and timeouts, a config dict from YAML as a
    botocore Config; other schemes get the options unchanged."""
    import botocore.config

    from lwta_vision.data.streaming import S3_CLIENT_CONFIG, litdata_storage_options

    config = litdata_storage_options("s3://b/p", {"region_name": "eu-west-1"})["config"]
    assert isinstance(config, botocore.config.Config)
    assert config.retries == S3_CLIENT_CONFIG["retries"] and config.connect_timeout == 10
    options = litdata_storage_options("s3://b/p", {"config": {"read_timeout": 5, "retries": {"max_attempts": 1}}})
    assert options["config"].read_timeout == 5 and options["config"].connect_timeout == 10
    assert options["config"].retries == {"max_attempts": 1}
    own = botocore.config.Config(read_timeout=7)
    assert litdata_storage_options("s3://b/p", {"config": own})["config"] is own
    assert litdata_storage_options("gs://b/p", {"project": "x"}) == {"project": "x"}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")  # the user's retry settings in the environment are kept
    assert litdata_storage_options("s3://b/p", {})["config"].retries is None
    with pytest.raises(ValueError, match="unknown key.*connect_timout.*connect_timeout"):
        _datamodule("s3://b/p", storage_options={"config": {"connect_timout": 1}})


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_error(args, capsys) -> str:
    """train.py's main: exit code 2 and exactly one ``error:`` line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        train_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_store_down_at_start_is_one_clear_error(tiny, tmp_path, capsys):
    _, url = tiny
    down = f"http://127.0.0.1:{_unused_port()}"  # nothing listens: connections are refused
    start = time.monotonic()
    with pytest.raises(ObjectStoreError) as err:
        _datamodule(url, storage_options=_options(down)).setup()
    assert time.monotonic() - start < 15
    assert down in str(err.value) and f"{url}/train/classes.json" in str(err.value)
    runs = str(tmp_path / "runs")
    line = _one_error(["fit", *CONFIG, *TINY_MODEL, "--data.init_args.data_dir", url,
                       "--data.init_args.storage_options", json.dumps(_options(down)),
                       "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                       "--trainer.max_epochs", "1", "--trainer.default_root_dir", runs,
                       "--trainer.logger.init_args.save_dir", runs], capsys)
    assert down in line and f"s3://{BUCKET}/" in line and "storage_options" in line


def test_store_that_never_answers_times_out(tiny):
    """A server that accepts connections and says nothing (hung, or a dead host behind a proxy): read_timeout
    bounds the wait, then one error naming the endpoint."""
    _, url = tiny
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ObjectStoreError, match="timeout|timed out") as err:
            _datamodule(url, storage_options=_options(endpoint, read_timeout=0.5)).setup()
        assert time.monotonic() - start < 15 and endpoint in str(err.value)


class _Relay(BaseHTTPRequestHandler):
    """Forwards requests to the S3 server; while ``server.cut`` is set, chunk downloads break off halfway (the
    connection drops mid-body, as when a store or the network goes away during a transfer)."""

    protocol_version = "HTTP/1.1"

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=10)
        upstream.request(self.command, self.path, body=self.rfile.read(length) if length else None,
                         headers=dict(self.headers.items()))
        reply = upstream.getresponse()
        data = reply.read()
        upstream.close()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "server", "date"):
                self.send_header(name, value)
        if reply.getheader("Content-Length") is None:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.cut and self.command == "GET" and "/chunk-" in self.path:
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
        else:
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def relay(s3):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Relay)
    server.daemon_threads, server.cut = True, False
    server.upstream = ("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[1]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()  # a no-op when the test has shut it down already
    server.server_close()
    thread.join()


def test_store_failing_mid_read_is_an_error_and_leaves_no_partial_chunk(tiny, relay, tmp_path):
    """Chunk downloads that break off halfway fail the epoch at once (no wait for litdata's 120 s chunk timeout);
    nothing partial is left under a chunk's name, and the next run on the same cache folder reads every image
    intact. A store that goes away altogether is one error naming the endpoint and the URL."""
    local, url = tiny
    endpoint, cache = f"http://127.0.0.1:{relay.server_port}", tmp_path / "cache"
    dm = _datamodule(url, storage_options=_options(endpoint), cache_dir=str(cache))
    dm.setup()  # class lists and indexes read while the store is up
    relay.cut = True
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)chunk-\d+-\d+\.bin.*S3 error"):
        _digests(dm.train_dataloader())
    assert time.monotonic() - start < 60
    for path in cache.rglob("chunk-*.bin"):  # whatever carries a chunk's name is the whole chunk
        assert path.read_bytes() == (local / "train" / path.name).read_bytes()
    # partial downloads keep litdata's temp name, <chunk>.tmp.<pid>; those of a killed run are removed next time
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    for partial in cache.rglob("chunk-*.tmp.*"):  # abandoned when the first one failed: as if this run was killed
        partial.rename(partial.with_name(f"{partial.name.rsplit('.', 1)[0]}.{dead.pid}"))
    for index in cache.rglob("index.json"):
        (index.parent / f"chunk-0-0.bin.tmp.{dead.pid}").write_bytes(b"half a chunk")
    relay.cut = False
    here = _datamodule(local)
    here.setup()
    again = _datamodule(url, storage_options=_options(endpoint), cache_dir=str(cache))
    again.setup()
    assert not list(cache.rglob("*.tmp.*"))
    assert Counter(_digests(again.train_dataloader())) == Counter(_digests(here.train_dataloader()))
    assert _digests(again.val_dataloader()) == _digests(here.val_dataloader())
    # the store goes away altogether: making the next loader (it reads index.json) is one error naming it
    relay.shutdown()
    relay.server_close()
    with pytest.raises(ObjectStoreError, match=f"object store at {endpoint}.*{url}/train/index.json"):
        again.train_dataloader()
