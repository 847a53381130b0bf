"""A prepared data set read from a URL (`--data https://...`, fsspec URLs, `pipe:CMD`): the same
numbers as the local folder, and every way a remote read goes wrong as one line naming the URL.

The data set is served by a local HTTP server (127.0.0.1, a free port) under several prefixes,
each a copy of the `train_data` fixture served one way: as it is, with a shard altered, cut, or
missing, without HEAD or Content-Length, cutting the connection mid-shard, or stalling."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, assert_same_weights, run_here

from alexcli.data import dataset, remote, stream
from alexcli.errors import DataError, UsageError


class Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /PREFIX/NAME from the server's roots {PREFIX: (folder, mode)}. Modes: plain; nohead
    (HEAD is 501, GET has no Content-Length); cut (every GET of a shard sends half and closes);
    flaky (the first GET of each shard is cut); stall (a shard's headers, then silence)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        parts = self.path.split("/")
        root, mode = self.server.roots.get(parts[1], (None, None)) if len(parts) == 3 else (None, None)
        f = root / parts[2] if root else None
        if f is None or not f.is_file():
            self.send_error(404, "File not found")
            return
        if not body and mode == "nohead":
            self.send_error(501, "Unsupported method")
            return
        data = f.read_bytes()
        shard = f.suffix == ".tar"
        with self.server.lock:
            self.server.gets[self.path] = n = self.server.gets.get(self.path, 0) + body
        self.send_response(200)
        if mode != "nohead":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        if shard and (mode == "cut" or (mode == "flaky" and n == 1)):
            self.wfile.write(data[:len(data) // 2])
            return  # HTTP/1.0: the connection closes, short of its Content-Length
        if shard and mode == "stall":
            time.sleep(3)
        self.wfile.write(data)


def flip_jpeg(shard: Path, sample: int = 0) -> None:
    """Bytes flipped inside one sample's JPEG: same size, still a tar, still a JPEG."""
    with tarfile.open(shard) as tar:
        m = [m for m in tar.getmembers() if m.name.endswith(".jpg")][sample]
    raw = bytearray(shard.read_bytes())
    for i in range(m.offset_data + m.size // 2, m.offset_data + m.size // 2 + 16):
        raw[i] ^= 0x55
    shard.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def site(train_data, tmp_path_factory):
    """The server's base URL; train_data served as /good, /nohead, /cut, /flaky, /stall, and altered
    copies as /flipped (train-000000 and val-000000 with bytes flipped), /short (val-000000 and
    train-000001 cut by 4096 bytes), /missing (val-000001 deleted), /fewer (val-000000 one sample
    short, padded back to its size)."""
    root = tmp_path_factory.mktemp("site")

    def copy(name):
        dst = root / name
        shutil.copytree(train_data, dst, ignore=shutil.ignore_patterns(".alexcli-*"))
        return dst

    flipped = copy("flipped")
    flip_jpeg(flipped / "train-000000.tar")
    flip_jpeg(flipped / "val-000000.tar")
    short = copy("short")
    for name in ("val-000000.tar", "train-000001.tar"):
        (short / name).write_bytes((short / name).read_bytes()[:-4096])
    missing = copy("missing")
    (missing / "val-000001.tar").unlink()
    fewer = copy("fewer")
    shard = fewer / "val-000000.tar"
    size = shard.stat().st_size
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[-3].offset  # the last sample's three members dropped
    shard.write_bytes(shard.read_bytes()[:cut] + b"\0" * (size - cut))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.lock, server.gets = threading.Lock(), {}
    server.roots = {"good": (train_data, "plain"), "nohead": (train_data, "nohead"), "cut": (train_data, "cut"),
                    "flaky": (train_data, "flaky"), "stall": (train_data, "stall"), "flipped": (flipped, "plain"),
                    "short": (short, "plain"), "shortnohead": (short, "nohead"), "missing": (missing, "plain"),
                    "fewer": (fewer, "plain")}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setenv("ALEXCLI_REMOTE_BACKOFF", "0.01")  # the retries, without their waits


def last_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert lines, r
    return lines[-1]


def one_line_error(r, *parts) -> str:
    """R failed with exit 2 and one `error:` line (no traceback) holding every one of PARTS."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for p in parts:
        assert p in errors[0], (p, errors[0])
    return errors[0]


def numbers(result: dict) -> dict:
    """An eval/ensemble result without what names its data or files."""
    return {"split": result["split"], "images": result["images"], "crops": result["crops"],
            "models": [{k: v for k, v in m.items() if k != "path"} for m in result["models"]],
            "ensemble": result["ensemble"]}


def train(data, out, *extra):
    return run_here("train", "--data", data, "--out", out, *TINY_TRAIN, *extra)


@pytest.fixture(scope="module")
def runs(site, train_data, tmp_path_factory):
    """Two epochs from the URL and from the folder, same seed and settings."""
    base, _ = site
    root = tmp_path_factory.mktemp("remote-runs")
    got = {}
    for name, data in (("url", f"{base}/good"), ("local", train_data)):
        r = train(data, root / name, "--epochs", "2", "--json")
        assert r.returncode == 0, r.stderr
        got[name] = root / name / "ckpt-e002.safetensors"
    return got


# ---------------------------------------------------------------- the same numbers as the folder

def test_training_from_a_url_gives_the_folders_weights(runs, site):
    from alexcli.checkpoint import read_meta

    assert_same_weights(runs["url"], runs["local"])
    meta = read_meta(runs["url"])
    assert meta["data"]["folder"] == f"{site[0]}/good"  # the URL as given, its // kept
    assert meta["config"]["data"] == f"{site[0]}/good"
    rows = [json.loads(line) for line in (runs["url"].parent / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (runs["local"].parent / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, local):
        assert (a["val_top1_error"], a["val_top5_error"], a["train_loss"]) == \
               (b["val_top1_error"], b["val_top5_error"], b["train_loss"])


def test_eval_and_ensemble_from_a_url_equal_the_folders(runs, site, train_data):
    url = f"{site[0]}/good"
    for cmd in (["eval", runs["url"]], ["ensemble", runs["url"], runs["local"]]):
        for crops in ("center", "ten"):
            local = run_here(*cmd, "--data", train_data, "--crops", crops, "--json")
            remote_ = run_here(*cmd, "--data", url, "--crops", crops, "--json")
            assert local.returncode == 0 and remote_.returncode == 0, remote_.stderr
            assert numbers(json.loads(remote_.stdout)) == numbers(json.loads(local.stdout))
            assert json.loads(remote_.stdout)["data"] == url
    # --data left out: the URL the checkpoint recorded; decoding in a worker process
    r = run_here("eval", runs["url"], "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    local = run_here("eval", runs["local"], "--json")
    assert json.loads(r.stdout)["data"] == url and numbers(json.loads(r.stdout)) == numbers(json.loads(local.stdout))


def test_resume_from_a_url_checks_the_data_sets_identity(runs, site, prepared, tmp_path):
    url = f"{site[0]}/good"
    out = tmp_path / "r"
    assert train(url, out, "--epochs", "1").returncode == 0
    r = train(url, out, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_weights(out / "ckpt-e002.safetensors", runs["local"])
    site[1].roots["other"] = (prepared[0], "plain")  # another data set, at another URL
    r = train(f"{site[0]}/other", out, "--epochs", "3", "--resume")
    one_line_error(r, f"--data {site[0]}/other is not the data set the run in {out} trained on ({url})")


def test_neighbors_from_a_url_equal_the_folders(runs, site, train_data, demo_src, tmp_path):
    query = next((demo_src / "train").rglob("*.JPEG"))
    got = []
    for data in (f"{site[0]}/good", train_data):
        r = run_here("neighbors", runs["local"], query, "--data", data, "--k", "3", "--workers", "0",
                     "--device", "cpu", "--cache", tmp_path / f"{len(got)}.safetensors", "--json")
        assert r.returncode == 0, r.stderr
        got.append(json.loads(r.stdout))
    assert got[0]["queries"] == got[1]["queries"] and got[0]["data"] == f"{site[0]}/good"


def test_the_loader_reads_the_same_batches_from_a_url(site, train_data):
    for workers in (0, 1):
        a = list(stream.batches(dataset.open_split(f"{site[0]}/good", "val"), 5, train=False, workers=workers))
        b = list(stream.batches(dataset.open_split(train_data, "val"), 5, train=False, workers=workers))
        assert len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_two_ranks_each_stream_their_own_shards(site, train_data, tmp_path):
    """--gpus 2 (DDP, gloo on the CPU): every rank streams its shards from the URL."""
    for name, data in (("url", f"{site[0]}/good"), ("local", train_data)):
        r = train(data, tmp_path / name, "--epochs", "1", "--gpus", "2", "--device", "cpu")
        assert r.returncode == 0, r.stderr
    assert_same_weights(tmp_path / "url" / "ckpt-e001.safetensors", tmp_path / "local" / "ckpt-e001.safetensors")


# ---------------------------------------------------------------- what goes wrong, in one line

def test_an_altered_shard_stops_training_before_its_epoch_is_saved(site, tmp_path):
    url = f"{site[0]}/flipped"
    for extra in ((), ("--loader-workers", "1")):
        out = tmp_path / f"run{len(extra)}"
        r = train(url, out, "--epochs", "1", *extra)
        one_line_error(r, f"{url}/train-000000.tar: sha256 differs from dataset.json")
        assert not list(out.glob("ckpt-*")) and not list(out.glob("state-*"))  # nothing committed


def test_an_altered_shard_stops_eval(runs, site):
    url = f"{site[0]}/flipped"
    for workers in ("0", "1"):
        r = run_here("eval", runs["url"], "--data", url, "--workers", workers, "--json")
        assert r.stdout == ""
        one_line_error(r, f"{url}/val-000000.tar: sha256 differs from dataset.json (corrupt or replaced)")
    r = run_here("verify", url)  # alexcli verify URL lists both
    assert r.returncode == 2
    assert f"{url}/train-000000.tar: sha256 differs" in r.stdout and f"{url}/val-000000.tar: sha256 differs" in r.stdout
    r = run_here("verify", f"{site[0]}/good")
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_verify_still_checks_size_and_count(runs, site):
    ckpt = runs["url"]
    # a shard cut short: found by the HEAD's size when the split is opened ...
    r = run_here("eval", ckpt, "--data", f"{site[0]}/short", "--no-verify")
    one_line_error(r, f"{site[0]}/short/val-000000.tar: ", " bytes, but dataset.json says ")
    # ... and, from a server with neither HEAD nor Content-Length, by the bytes that arrive
    r = run_here("eval", ckpt, "--data", f"{site[0]}/shortnohead", "--no-verify")
    one_line_error(r, f"{site[0]}/shortnohead/val-000000.tar: ", " bytes, but dataset.json says ",
                   "(truncated or replaced)")
    # one sample short, padded back to its size: the sample count
    r = run_here("eval", ckpt, "--data", f"{site[0]}/fewer", "--no-verify")
    one_line_error(r, f"{site[0]}/fewer/val-000000.tar: 11 samples read, but dataset.json says 12")
    # a server without HEAD, the data intact: fine
    assert run_here("eval", ckpt, "--data", f"{site[0]}/nohead").returncode == 0


def test_missing_files_and_refused_connections_are_one_line(runs, site, tmp_path):
    ckpt = runs["url"]
    r = run_here("eval", ckpt, "--data", f"{site[0]}/missing")
    one_line_error(r, f"{site[0]}/missing/val-000001.tar: missing (listed in dataset.json)")
    r = run_here("train", "--data", f"{site[0]}/nothing", "--out", tmp_path / "x")
    one_line_error(r, f"{site[0]}/nothing/dataset.json: HTTP 404")
    assert not (tmp_path / "x").exists()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_here("eval", ckpt, "--data", f"http://127.0.0.1:{port}/in1k")
    one_line_error(r, f"http://127.0.0.1:{port}/in1k/dataset.json: cannot connect (", "gave up after 4 tries")


def test_a_connection_cut_mid_shard_is_retried_then_one_line(runs, site, monkeypatch):
    ckpt = runs["url"]
    r = run_here("eval", ckpt, "--data", f"{site[0]}/cut")
    one_line_error(r, f"{site[0]}/cut/val-000000.tar: connection cut after ", "gave up after 4 tries")
    # cut once per shard: the retry reads it again from its first byte, and the numbers are the folder's
    good = json.loads(run_here("eval", ckpt, "--data", f"{site[0]}/good", "--json").stdout)
    r = run_here("eval", ckpt, "--data", f"{site[0]}/flaky", "--json")
    assert r.returncode == 0, r.stderr
    assert numbers(json.loads(r.stdout)) == numbers(good)
    assert site[1].gets["/flaky/val-000000.tar"] == 2
    # a server that goes silent: the timeout
    monkeypatch.setenv("ALEXCLI_REMOTE_TIMEOUT", "0.3")
    monkeypatch.setenv("ALEXCLI_REMOTE_RETRIES", "1")
    r = run_here("eval", ckpt, "--data", f"{site[0]}/stall")
    one_line_error(r, f"{site[0]}/stall/val-000000.tar: connection cut after 0 of ", "(timed out)",
                   "gave up after 2 tries")


# ---------------------------------------------------------------- pipe: and fsspec

def test_pipe_reads_what_the_folder_holds(runs, train_data, tmp_path):
    ckpt = runs["url"]
    pipe = f"pipe:cat {train_data}/{{}}"
    local = json.loads(run_here("eval", ckpt, "--data", train_data, "--json").stdout)
    r = run_here("eval", ckpt, "--data", pipe, "--json")
    assert r.returncode == 0, r.stderr
    assert numbers(json.loads(r.stdout)) == numbers(local) and json.loads(r.stdout)["data"] == pipe
    r = train(pipe, tmp_path / "p", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert_same_weights(tmp_path / "p" / "ckpt-e002.safetensors", runs["local"])


def test_a_failing_pipe_is_one_line_naming_the_command_and_file(runs, train_data, tmp_path):
    ckpt = runs["url"]
    r = run_here("eval", ckpt, "--data", f"pipe:cat {tmp_path}/nope/{{}}")
    one_line_error(r, f"pipe:cat {tmp_path}/nope/dataset.json: the command exited with status 1 (cat: ")
    # every byte written, then a failure: still an error
    pipe = f"pipe:cat {train_data}/{{}} && test {{}} != val-000001.tar"
    r = run_here("eval", ckpt, "--data", pipe)
    one_line_error(r, f"pipe:cat {train_data}/val-000001.tar && test val-000001.tar != val-000001.tar: "
                      f"the command exited with status 1")
    r = run_here("eval", ckpt, "--data", "pipe:cat shards/x")
    one_line_error(r, "a pipe: command needs {} where the file name goes")


def test_fsspec_file_url(runs, train_data):
    pytest.importorskip("fsspec", reason="fsspec is not installed (pip install fsspec)")
    ckpt = runs["url"]
    local = json.loads(run_here("eval", ckpt, "--data", train_data, "--json").stdout)
    r = run_here("eval", ckpt, "--data", f"file://{train_data}", "--json")
    assert r.returncode == 0, r.stderr
    assert numbers(json.loads(r.stdout)) == numbers(local)
    r = run_here("eval", ckpt, "--data", f"file://{train_data}/nope")
    one_line_error(r, f"file://{train_data}/nope/dataset.json: not found")


def test_without_fsspec_an_s3_url_says_what_to_install(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec fails, as where it is not installed
    r = run_here("eval", runs["url"], "--data", "s3://bucket/in1k")
    one_line_error(r, "s3://bucket/in1k/dataset.json: reading s3:// URLs needs fsspec and s3fs: pip install fsspec s3fs")


def test_a_missing_fsspec_backend_is_named(runs):
    pytest.importorskip("fsspec", reason="fsspec is not installed")
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    r = run_here("eval", runs["url"], "--data", "s3://bucket/in1k")
    one_line_error(r, "s3://bucket/in1k", "pip install s3fs")


# ---------------------------------------------------------------- the location itself

def test_locations():
    from alexcli.data.remote import DataLocation, is_url, join

    assert is_url("https://h/x") and is_url("s3://b/x") and is_url("pipe:cat {}") and not is_url("shards/x")
    assert not is_url("C:/data") and not is_url(Path("https://h/x"))
    assert join("https://h/in1k/", "dataset.json") == "https://h/in1k/dataset.json"
    assert join("pipe:aws s3 cp s3://b/in1k/{} -", "train-000000.tar") == "pipe:aws s3 cp s3://b/in1k/train-000000.tar -"
    loc = DataLocation("https://h/data/in1k/")
    assert str(loc) == "https://h/data/in1k/" and loc.recorded() == "https://h/data/in1k/" and loc.name == "in1k"
    assert DataLocation("pipe:aws s3 cp s3://b/in1k/{} -").name == "in1k"
    assert DataLocation("shards/demo").display("dataset.json") == str(Path("shards/demo") / "dataset.json")
    assert DataLocation("shards/demo").recorded() == str(Path("shards/demo").resolve())
    with pytest.raises(UsageError, match="needs {}"):
        DataLocation("pipe:cat x")


def test_the_default_run_folder_is_named_after_the_url(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_here("train", "--data", f"{site[0]}/good", *TINY_TRAIN, "--epochs", "1", "--steps-per-epoch", "1",
                 "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"] == str(Path("runs") / "good")


def test_a_remote_shard_is_checked_before_any_sample_is_used(site):
    """The sha256 is known at a shard's last byte, and read_samples parses a remote shard only after
    it: no sample of a bad shard is ever yielded (so no batch, snapshot or epoch uses it)."""
    from alexcli.data.tar import read_samples

    split = dataset.open_split(f"{site[0]}/flipped", "val")
    it = read_samples(split.path(split.shards[0]), split.shards[0]["samples"])
    with pytest.raises(DataError, match="sha256 differs"):
        next(it)
    assert next(read_samples(split.path(split.shards[1]), split.shards[1]["samples"])).key  # its intact shard
    unchecked = dataset.open_split(f"{site[0]}/flipped", "val", verify=False)
    assert len(list(read_samples(unchecked.path(unchecked.shards[0])))) == unchecked.shards[0]["samples"]
    assert remote.is_url(str(split.path(split.shards[0])))


def test_a_file_of_the_data_set_as_a_stream(site, train_data):
    from alexcli.data.remote import DataLocation

    for where in (f"{site[0]}/good", f"pipe:cat {train_data}/{{}}", train_data):
        with DataLocation(where).open("dataset.json") as f:
            assert json.loads(f.read()) == json.loads((train_data / "dataset.json").read_text())
    with pytest.raises(DataError, match="the command exited with status 1"):
        with DataLocation("pipe:cat /nonexistent/{}").open("dataset.json") as f:
            f.read()
