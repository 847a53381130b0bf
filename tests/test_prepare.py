import hashlib
import io
import json
import signal
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from alexcli.data import stats as S
from alexcli.data.demo import BROKEN, CLASSES, make_demo
from alexcli.data.prepare import PrepareConfig, prepare
from alexcli.data.dataset import verify_shard
from alexcli.data.tar import _tobuf, member_header
from alexcli.errors import DataError, StrictRejectError, UsageError
from conftest import SMALL


def stats_content(path):
    """Tensors and metadata of a safetensors file (its header's key order is not fixed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


def read_shard(path):
    """{key: {ext: bytes}} in archive order, read with plain tarfile."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def all_samples(out, manifest, split):
    for entry in manifest["splits"][split]["shards"]:
        yield from read_shard(out / entry["name"]).items()


def test_counts_add_up_and_broken_files_are_listed(prepared, demo_src):
    out, summary = prepared
    manifest = json.loads((out / "dataset.json").read_text())
    n_train = len(CLASSES) * SMALL["train_per_class"]
    assert manifest["splits"]["train"]["found"] == n_train + len(BROKEN)
    assert manifest["splits"]["train"]["written"] == n_train
    assert manifest["splits"]["val"]["written"] == len(CLASSES) * SMALL["val_per_class"]
    assert summary["found"] == summary["written"] + summary["rejected"]
    rejected = json.loads((out / "rejected.json").read_text())
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"].split(" (")[0] for r in rejected}
    assert reasons == {
        "broken_empty.JPEG": "empty file",
        "broken_text.JPEG": "not an image: no image format recognised",
        "broken_truncated.JPEG": "truncated or corrupt: image file is truncated",
    }
    assert manifest["classes"] == sorted(CLASSES)


def test_shards_match_the_manifest(prepared):
    out, _ = prepared
    manifest = json.loads((out / "dataset.json").read_text())
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            path = out / entry["name"]
            assert path.stat().st_size == entry["bytes"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
            samples = read_shard(path)
            assert len(samples) == entry["samples"]
            for key, members in samples.items():
                assert "." not in key and set(members) == {"jpg", "cls", "json"}
                meta = json.loads(members["json"])
                assert int(members["cls"]) == meta["class"] == manifest["classes"].index(meta["path"].split("/")[1])
                assert Image.open(io.BytesIO(members["jpg"])).size == (32, 32)
            verify_shard(out, entry, full=True)
    assert not list(out.glob("*.tmp")) and not (out / ".partial").exists()


def test_training_order_is_shuffled_and_val_is_not(prepared):
    out, _ = prepared
    manifest = json.loads((out / "dataset.json").read_text())
    train = [json.loads(m["json"])["path"] for _, m in all_samples(out, manifest, "train")]
    val = [json.loads(m["json"])["path"] for _, m in all_samples(out, manifest, "val")]
    assert train != sorted(train) and len(set(train)) == len(train)
    assert val == sorted(val)


def test_webdataset_reads_the_shards(prepared):
    wds = pytest.importorskip("webdataset")
    out, _ = prepared
    manifest = json.loads((out / "dataset.json").read_text())
    urls = [str(out / e["name"]) for e in manifest["splits"]["val"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "cls")
    items = list(ds)
    assert len(items) == manifest["splits"]["val"]["written"]
    assert items[0][0].shape == (32, 32, 3) and isinstance(items[0][1], int)


def _reference_pixels(out, src, manifest, exact):
    """The training images each mode's statistics are over, as float64 HxWx3 arrays on 0..1: the
    JPEGs in the shards (--exact-stats), or each source converted again, before encoding."""
    from alexcli.data.config import ImageParams
    from alexcli.data.image import convert_pixels

    params = ImageParams(size=manifest["parameters"]["size"], quality=manifest["parameters"]["quality"])
    images = []
    for _, m in all_samples(out, manifest, "train"):
        if exact:
            im = Image.open(io.BytesIO(m["jpg"])).convert("RGB")
        else:
            im = convert_pixels((src / json.loads(m["json"])["path"]).read_bytes(), params).image
        images.append(np.asarray(im, np.float64) / 255)
    return np.stack(images)


@pytest.fixture(scope="module")
def prepared_exact(demo_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared-exact") / "demo"
    return out, prepare(demo_src, out, PrepareConfig(size=32, shard_size=16, workers=1, seed=3, exact_stats=True))


@pytest.mark.parametrize("exact", [False, True], ids=["before-encoding", "exact-stats"])
def test_stats_equal_a_one_pass_numpy_computation(exact, prepared, prepared_exact, demo_src):
    out, summary = prepared_exact if exact else prepared
    manifest = json.loads((out / "dataset.json").read_text())
    imgs = _reference_pixels(out, demo_src, manifest, exact)
    pixels = imgs.reshape(-1, 3)
    cov = np.cov(pixels.T, bias=True)
    eigval, eigvec = np.linalg.eigh(cov)
    st = S.load(out / "stats.safetensors")
    rel = dict(rtol=1e-6, atol=0)
    np.testing.assert_allclose(st["mean_image"], imgs.mean(0).transpose(2, 0, 1), **rel)
    np.testing.assert_allclose(st["rgb_mean"], pixels.mean(0), **rel)
    np.testing.assert_allclose(st["rgb_std"], pixels.std(0), **rel)
    np.testing.assert_allclose(st["rgb_cov"], cov, **rel)
    np.testing.assert_allclose(st["pca_eigval"], eigval[::-1], **rel)
    # Eigenvectors up to sign.
    for k in range(3):
        v, ref = st["pca_eigvec"][:, k], eigvec[:, 2 - k]
        np.testing.assert_allclose(v * np.sign(v @ ref), ref, rtol=1e-6, atol=1e-9)
    assert manifest["stats"]["image_count"] == len(imgs)
    pixels_said = "as written" if exact else "before encoding"
    assert manifest["stats"]["pixels"] == summary["stats"]["pixels"] == pixels_said
    from safetensors import safe_open

    with safe_open(str(out / "stats.safetensors"), framework="numpy") as f:
        assert json.loads(f.metadata()["alexcli"])["pixels"] == pixels_said
    # The two modes write the same shards: only the statistics differ.
    other = (prepared if exact else prepared_exact)[0]
    for entry, twin in zip(manifest["splits"]["train"]["shards"],
                           json.loads((other / "dataset.json").read_text())["splits"]["train"]["shards"]):
        assert entry == twin


def test_stats_before_encoding_are_close_to_the_exact_ones(demo_src, tmp_path):
    """The default's statistics against --exact-stats on photo-like images at quality 90: JPEG moves
    the mean and the leading component very little; the small eigenvalues (chroma) shrink a bit."""
    got = {}
    for exact in (False, True):
        out = tmp_path / str(exact)
        prepare(demo_src, out, PrepareConfig(size=64, shard_size=64, workers=1, exact_stats=exact))
        got[exact] = S.load(out / "stats.safetensors")
    a, b = got[False], got[True]
    # Measured here: 1.2e-5, 0.0096, eigenvalues within 2.9%, cosines from 0.9954 (the demo's two leading
    # eigenvalues are close, so their vectors turn easily); on 500 ImageNet photos at 256: 1.0e-4,
    # 0.0049, 5.6%, 0.9999999 (docs/design.md).
    assert np.abs(a["rgb_mean"] - b["rgb_mean"]).max() < 1e-3
    assert np.abs(a["mean_image"] - b["mean_image"]).max() < 0.02
    np.testing.assert_allclose(a["pca_eigval"], b["pca_eigval"], rtol=0.06)
    # Each eigenvector, up to sign (measured: 0.9955, 0.9954, 0.9999).
    cosines = np.abs(np.sum(a["pca_eigvec"] * b["pca_eigvec"], axis=0))
    assert (cosines > 0.99).all(), cosines
    assert not np.array_equal(a["rgb_cov"], b["rgb_cov"])  # they are different computations


def _numpy_sums(images):
    x = np.stack(images).astype(np.int64)
    pixels = x.reshape(-1, 3)
    return x.sum(0), pixels.T @ pixels


def test_the_c_statistics_kernel_is_built_where_a_compiler_is():
    # setup.py's extension is optional (an install without a compiler falls back to numpy); where
    # there is one, a missing kernel means the build broke and the statistics take three times as long.
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the numpy kernel is the one in use")
    assert S.KERNEL == "c" and S.KERNELS == ("c", "numpy")


@pytest.mark.parametrize("kernel", S.KERNELS)  # "c" where built: the test above says whether it must be
@pytest.mark.parametrize("n", [3, 300])  # 300: the uint16 image sum is folded into int64 after 257 images
def test_image_sums_are_exact(n, kernel):
    rng = np.random.default_rng(n)
    size = 33  # odd: rows of pixels of any length, not only blocks of 256
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    images[0][:] = 255  # the largest products, in both an early and a late fold
    images[-1][:] = 255
    images[1] = rng.integers(0, 256, (2 * size, 2 * size, 3), dtype=np.uint8)[::2, ::2]  # not contiguous
    sums = S.ImageSums(size, kernel)
    # image 1 goes in as numpy (the view itself), the others as torch or PIL
    as_given = [lambda a: __import__("torch").from_numpy(np.ascontiguousarray(a)), lambda a: a, Image.fromarray]
    for k, img in enumerate(images):
        sums.add(as_given[k % 3](img))
    got = sums.take()
    image_sum, gram = _numpy_sums(images)
    assert got["image_sum"].dtype == (np.uint16 if n <= 257 else np.int64)
    assert np.array_equal(got["image_sum"], image_sum)
    assert np.array_equal(got["gram"], gram) and got["count"][0] == n
    assert sums.take()["count"][0] == 0  # take() resets


@pytest.mark.skipif("c" not in S.KERNELS, reason="the C statistics kernel was not built here")
def test_pil_images_are_summed_where_pil_keeps_them(monkeypatch):
    """The C kernel reads a PIL RGB image's pixels in place (its Arrow export: 4 bytes per pixel),
    with the sums of the packed array; where PIL holds an image in several memory blocks it has
    no single buffer to export, and the image is copied instead, with the same sums."""
    calls = []
    real = S._pixsums
    monkeypatch.setattr(S, "_pixsums", SimpleNamespace(
        add=real.add, add_arrow=lambda *a: (calls.append(1), real.add_arrow(*a))[1]))
    rng = np.random.default_rng(7)
    size = 37  # odd: a row is not a multiple of any vector width
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(5)]
    arrays[0][:] = 255
    in_place, copied = S.ImageSums(size), S.ImageSums(size)
    for a in arrays:
        in_place.add(Image.fromarray(a))
        copied.add(a)
    assert len(calls) == 5
    got, want = in_place.take(), copied.take()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    image_sum, gram = _numpy_sums(arrays)
    assert np.array_equal(got["image_sum"], image_sum) and np.array_equal(got["gram"], gram)

    block = Image.core.get_block_size()
    Image.core.set_block_size(4096)  # a 37x37 image (5.5 kB) now takes two blocks
    try:
        split = Image.fromarray(arrays[1])
    finally:
        Image.core.set_block_size(block)
    with pytest.raises(ValueError):
        split.__arrow_c_array__()
    calls.clear()
    in_place.add(split)
    assert not calls and np.array_equal(in_place.take()["image_sum"], arrays[1])
    with pytest.raises(ValueError, match="RGB image"):  # the capsules of a grey image are refused
        real.add_arrow(*Image.new("L", (size, size)).__arrow_c_array__(), np.zeros(size * size * 3, np.uint16),
                       np.zeros(6, np.int64))


@pytest.mark.parametrize("kernel", S.KERNELS)  # "c" where built: the test above says whether it must be
@pytest.mark.parametrize("size, n", [(256, 257), (300, 2), (600, 3)])
def test_image_sums_of_white_images_stay_exact_past_float32(size, n, kernel):
    # White images: a column's sum of r*r over more than 258 rows exceeds 2^24 (float32's exact
    # integers), the Gram total 2^32; 257 images fill the uint16 image sum. All must come out exact.
    sums = S.ImageSums(size, kernel)
    white = np.full((size, size, 3), 255, np.uint8)
    for _ in range(n):
        sums.add(white)
    got = sums.take()
    assert (got["gram"] == n * size * size * 255 * 255).all() and (got["image_sum"] == n * 255).all()
    assert got["image_sum"].dtype == np.uint16  # 257 * 255 = 65535 still fits


@pytest.mark.parametrize("name", ["", "00000007_n01440764_10026.jpg", "x" * 100, "x" * 101, "caf\u00e9.json"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 25_000, 8 ** 11 - 1, 8 ** 11])
def test_member_headers_are_tarfiles_own(name, size):
    try:
        ref = _tobuf(name, size)
    except ValueError:  # tarfile: "overflow in number field"
        with pytest.raises(ValueError):
            member_header(name, size)
        return
    assert member_header(name, size) == ref


@pytest.fixture(scope="module")
def pooled_src(tmp_path_factory):
    """Enough chunks (12 of 32 images) for three workers, and its one-worker shards."""
    src = tmp_path_factory.mktemp("pooled-src")
    make_demo(src, seed=2, train_per_class=44, val_per_class=4, min_side=24, max_side=70, broken=False)
    ref = tmp_path_factory.mktemp("pooled-ref") / "out"
    prepare(src, ref, PrepareConfig(size=32, shard_size=64, workers=1, seed=3))
    return src, ref


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("workers", [2, 3])
def test_more_workers_write_the_same_bytes(pooled_src, tmp_path, workers, method, monkeypatch):
    """This process and WORKERS - 1 forked or spawned ones, chunks dealt to whoever is free: the
    shards (their sha256 in dataset.json) and the statistics are those of one worker."""
    import multiprocessing
    import os
    import time

    import alexcli.data.prepare as P

    src, ref = pooled_src
    used, real, here = [], multiprocessing.get_context, os.getpid()
    monkeypatch.setattr(P, "start_method", lambda: method)
    monkeypatch.setattr(P.mp, "get_context", lambda m: used.append(m) or real(m))
    # this process converts slowly (a forked worker inherits the wrapper, but not the pid), so the
    # other workers, spawned ones too, get chunks of their own however fast this machine is
    convert = P._process_chunk
    monkeypatch.setattr(P, "_process_chunk", lambda task: (time.sleep(0.15) if os.getpid() == here else None,
                                                           convert(task))[1])
    by = []
    finished = P._Board.finished
    monkeypatch.setattr(P._Board, "finished", lambda self, w, i, r: (by.append(w), finished(self, w, i, r))[1])
    out = tmp_path / "out"
    prepare(src, out, PrepareConfig(size=32, shard_size=64, workers=workers, seed=3))
    assert used == [method] and set(by) == set(range(workers - 1))  # every started worker converted some
    a = json.loads((ref / "dataset.json").read_text())
    b = json.loads((out / "dataset.json").read_text())
    assert a["splits"] == b["splits"] and a["fingerprint"] == b["fingerprint"]
    assert stats_content(ref / "stats.safetensors") == stats_content(out / "stats.safetensors")
    for shard in sorted(ref.glob("*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_rerun_is_up_to_date_and_other_data_is_refused(prepared, demo_src, tmp_path):
    out, _ = prepared
    again = prepare(demo_src, out, PrepareConfig(size=32, shard_size=16, workers=1, seed=3))
    assert again["status"] == "up to date"
    with pytest.raises(UsageError, match="holds a different data set; choose another --out or pass --overwrite"):
        prepare(demo_src, out, PrepareConfig(size=32, shard_size=16, workers=1, seed=4))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_text("x")
    with pytest.raises(UsageError, match="holds files that are not an alexcli data set"):
        prepare(demo_src, foreign, PrepareConfig(size=32))
    done = prepare(demo_src, foreign, PrepareConfig(size=32, overwrite=True, workers=1))
    assert done["status"] == "prepared" and (foreign / "thesis.pdf").exists()  # never deletes user files


def test_strict_fails_and_keeps_work(demo_src, tmp_path):
    with pytest.raises(StrictRejectError, match=r"--strict: 3 files cannot be used \(0 found while listing, 3 failed "
                                                r"to convert\), listed in .*rejected.json"):
        prepare(demo_src, tmp_path / "s", PrepareConfig(size=32, shard_size=16, workers=1, strict=True))
    assert not (tmp_path / "s" / "dataset.json").exists()
    assert len(json.loads((tmp_path / "s" / "rejected.json").read_text())) == 3
    assert prepare(demo_src, tmp_path / "s", PrepareConfig(size=32, shard_size=16, workers=1))["status"] == "resumed"


def test_strict_counts_the_listings_rejects_and_the_conversions(demo_src, tmp_path):
    """--strict's one line counts every file that cannot be used, not only those the listing found."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    (src / "train" / "disc" / "gone.JPEG").symlink_to(tmp_path / "nowhere")
    with pytest.raises(StrictRejectError, match=r"--strict: 4 files cannot be used \(1 found while listing, 3 failed "
                                                r"to convert\)"):
        prepare(src, tmp_path / "s", PrepareConfig(size=16, workers=1, strict=True))


def test_hidden_files_are_skipped_not_rejected(tmp_path):
    src = tmp_path / "src"
    make_demo(src, train_per_class=2, val_per_class=1, min_side=30, max_side=40, broken=False)
    for junk in ("train/disc/.DS_Store", "train/disc/._disc_0000.JPEG", "train/.DS_Store", "val/Thumbs.db",
                 "train/.ipynb_checkpoints/x.JPEG"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_bytes(b"\0\0junk")
    summary = prepare(src, tmp_path / "o", PrepareConfig(size=16, workers=1))
    assert summary["rejected"] == 0 and summary["skipped"] == 5
    assert summary["found"] == summary["written"] == 8 * 3
    manifest = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert ".ipynb_checkpoints" not in manifest["classes"]


def test_pixel_limit_rejects_are_listed(tmp_path):
    src = tmp_path / "src"
    make_demo(src, train_per_class=2, val_per_class=0, min_side=30, max_side=40, broken=False)
    big = src / "train" / "disc" / "big.JPEG"
    Image.new("RGB", (120, 120)).save(big, "JPEG")
    summary = prepare(src, tmp_path / "o", PrepareConfig(size=16, workers=1, max_pixels=5000))
    rejected = json.loads((tmp_path / "o" / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == ["train/disc/big.JPEG"]
    assert "14400 pixels exceeds the limit of 5000" in rejected[0]["reason"]
    assert summary["found"] == summary["written"] + 1


def test_no_usable_training_image_is_an_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 training files could be used"):
        prepare(tmp_path, tmp_path / "o", PrepareConfig(size=16, workers=1))


# `alexcli prepare` that stops before converting its next chunk once two shards are complete,
# writes a marker and waits there, so the signal always finds it running with exactly those
# shards done (a fixed sleep per chunk raced the rest of the run on a busy machine).
PREPARE_HELD = """
import signal, sys, time
from pathlib import Path
import alexcli.data.prepare as P
# Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the test runner was started with
# SIGINT ignored (a background job of a script), which its children would inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)
marker, argv = Path(sys.argv[1]), sys.argv[2:]
partial = Path(argv[argv.index("--out") + 1]) / P.PARTIAL_DIR
orig = P._process_chunk
def held(task):
    if len(list(partial.glob("*.safetensors"))) >= 2:
        marker.write_text("held")
        time.sleep(3600)  # SIGINT ends this with KeyboardInterrupt, as it would a conversion
    return orig(task)
P._process_chunk = held
from alexcli.cli import main
sys.exit(main(argv))
"""


def _start(args, cwd, marker):
    return subprocess.Popen([sys.executable, "-c", PREPARE_HELD, str(marker), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_identical_output(demo_src, tmp_path, prepared, sig):
    ref_out, _ = prepared
    out = tmp_path / "resumed"
    args = ["prepare", demo_src, "--out", out, "--size", 32, "--shard-size", 16, "--workers", 1, "--seed", 3]
    from conftest import RUN_TIMEOUT, wait_for

    marker = tmp_path / "held"
    proc = _start(args, tmp_path, marker)
    wait_for(marker.exists, proc, "prepare finished two shards")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "interrupted:" in stderr and "run the same command again to continue" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "dataset.json").exists()
    # Whatever sits under a final name is complete: its size matches what its record says.
    finals = sorted(out.glob("*.tar"))
    assert finals, "at least one finished shard"
    ref = json.loads((ref_out / "dataset.json").read_text())
    ref_entries = {e["name"]: e for s in ref["splits"].values() for e in s["shards"]}
    for f in finals:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == ref_entries[f.name]["sha256"]

    done = subprocess.run([sys.executable, "-m", "alexcli", *map(str, args), "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "resumed"
    mine = json.loads((out / "dataset.json").read_text())
    for key in ("splits", "fingerprint", "stats", "classes", "summary"):
        if key == "summary":
            mine[key].pop("out"), ref[key].pop("out"), mine[key].pop("rejected_file"), ref[key].pop("rejected_file")
        assert mine[key] == ref[key], key
    assert stats_content(out / "stats.safetensors") == stats_content(ref_out / "stats.safetensors")
    assert (out / "rejected.json").read_bytes() == (ref_out / "rejected.json").read_bytes()
    assert not list(out.glob("*.tmp")) and not (out / ".partial").exists()


@pytest.mark.parametrize("exact", [False, True])
def test_prepare_does_not_import_torch_unless_exact_stats_needs_it(exact, demo_src, tmp_path):
    """torch's import costs over a second per process (the main one and every worker): the CLI's
    prepare and its worker code (run in-process with --workers 1) must not load it; --exact-stats'
    decoder of the written JPEGs does."""
    code = ("import sys\nfrom alexcli.cli import main\n"
            f"rc = main(['prepare', {str(demo_src)!r}, '--out', {str(tmp_path / 'o')!r}, '--size', '16', "
            f"'--workers', '1', '--json'{', ' + repr('--exact-stats') if exact else ''}])\n"
            "print(rc, sorted(m for m in ('torch', 'torchvision') if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.stderr.strip().splitlines()[-1] == ("0 ['torch']" if exact else "0 []")


@pytest.mark.parametrize("src, out", [("/data/imagenet", "shards/imagenet"), ("/dl/cifar-10-python.tar.gz", "shards/cifar10"),
                                      ("/dl/cifar-100-binary.tar.gz", "shards/cifar100"),
                                      ("/dl/ILSVRC2012_img_train.tar", "shards/imagenet"),
                                      ("/dl/imagenet-object-localization-challenge.zip", "shards/imagenet"),
                                      ("/data/birds.zip", "shards/birds")])
def test_default_out_is_named_after_the_data_set(src, out):
    from alexcli.data.prepare import default_out

    assert default_out(src) == Path(out)


def test_prepare_in_this_process_leaves_torch_threads_alone(demo_src, tmp_path):
    """--exact-stats with one worker set torch to one thread in the caller's process: a training
    run after it (a library caller, or the test suite) computed on 1 thread, not bit-identical."""
    import torch

    before = torch.get_num_threads()
    prepare(demo_src, tmp_path / "o", PrepareConfig(size=32, workers=1, exact_stats=True))
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- the pool's dealing (alexcli.data.prepare._Board)

def test_the_main_process_converts_what_it_would_otherwise_wait_for():
    from alexcli.data.prepare import _Board

    b = _Board(n_tasks=10, window=6)
    assert [b.claim(0), b.claim(0)] == [0, 1]  # a worker process holds IN_FLIGHT chunks, in plan order
    assert b.IN_FLIGHT == 2
    # chunk 0, to be written next, is with the worker: the main thread converts the next free one
    assert b.next_step() == ("convert", 2)
    b.put(2, "r2")
    assert b.next_step() == ("convert", 3)
    b.finished(0, 0, "r0")
    assert b.next_step() == ("write", 0) and b.take(0) == "r0"
    b.put(3, "r3")
    # the window: nothing handed out past writing + 6 = 7, so the results held stay bounded
    assert [b.claim(0)] == [4]
    assert b.next_step() == ("convert", 5) and b.next_step() == ("convert", 6)
    assert not b._free()
    b.finished(0, 1, "r1")
    assert b.next_step() == ("write", 1) and b.take(1) == "r1"
    assert b.next_step() == ("write", 2) and b.take(2) == "r2"  # what this process converted itself
    assert b.next_step() == ("write", 3) and b.take(3) == "r3"
    assert b.claim(0) == 7


def test_the_last_chunks_go_one_at_a_time():
    """Near the end a worker process holds one chunk, not IN_FLIGHT: a second one queued behind it
    would leave the main process idle at the end while the worker still had two to do."""
    import threading

    from alexcli.data.prepare import _Board

    b = _Board(n_tasks=5, window=20, converters=2)
    assert [b.claim(0), b.claim(0)] == [0, 1]
    b.finished(0, 0, "r0")
    assert b.claim(0) == 2  # 3 chunks were left for 2 processes: a second one queued, as before
    b.finished(0, 1, "r1")
    got = []
    t = threading.Thread(target=lambda: got.append(b.claim(0)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # 2 left for 2 processes, and it holds chunk 2: no second one
    assert b.next_step() == ("write", 0) and b.take(0) == "r0"
    assert b.next_step() == ("write", 1) and b.take(1) == "r1"
    assert b.next_step() == ("convert", 3)  # chunk 2 is with the worker: the main process takes 3
    b.finished(0, 2, "r2")
    t.join(5)
    assert got == [4]


def test_a_chunk_held_by_a_dead_worker_stops_the_run_and_the_dead_get_no_more():
    from alexcli.data.prepare import _Board

    b = _Board(n_tasks=6, window=8)
    assert b.claim(0) == 0
    b.lost(0)
    assert b.claim(0) is None  # its feed thread stops handing it chunks
    assert b.next_step() == ("died", 0)
    b.close()
    assert b.claim(1) is None  # closed (the run ends): no worker is handed anything more


def test_any_worker_death_stops_the_run_but_a_finished_worker_is_no_loss():
    """A worker that dies holding no chunk stops the run too (whether a run stops must not depend
    on the moment of the death); what is finished is written first. A worker that was told nothing
    more comes and delivered all it held ends its pipe normally."""
    from alexcli.data.prepare import _Board

    b = _Board(n_tasks=6, window=8, converters=3)
    assert [b.claim(0), b.claim(1)] == [0, 1]
    b.finished(0, 0, "r0")
    b.lost(0)  # between chunks: it held nothing
    assert b.claim(1) is None  # nothing new is handed out after a death...
    b.finished(1, 1, "r1")
    assert b.next_step() == ("write", 0) and b.take(0) == "r0"  # ...what is finished is written...
    assert b.next_step() == ("write", 1) and b.take(1) == "r1"
    assert b.next_step() == ("died", 0)  # ...and the run stops at the first chunk not finished

    b = _Board(n_tasks=2, window=8, converters=3)
    assert [b.claim(1), b.claim(2)] == [0, 1]
    assert b.claim(1) is None  # every chunk handed out: worker 1 is released
    b.lost(1)  # ...but it still held chunk 0: a death
    assert b.next_step() == ("died", 1)

    b = _Board(n_tasks=2, window=8, converters=3)
    assert [b.claim(1), b.claim(2)] == [0, 1]
    b.finished(1, 0, "r0")
    assert b.claim(1) is None
    b.lost(1)  # released, nothing held: the normal end of a worker
    b.finished(2, 1, "r1")
    assert b.next_step() == ("write", 0) and b.take(0) == "r0"
    assert b.next_step() == ("write", 1) and b.take(1) == "r1"


def test_a_worker_waits_for_room_and_is_woken_when_the_window_moves():
    import threading

    from alexcli.data.prepare import _Board

    b = _Board(n_tasks=4, window=2)
    assert b.next_step() == ("convert", 0) and b.next_step() == ("convert", 1)
    got = []
    t = threading.Thread(target=lambda: got.append(b.claim(0)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # window full: the worker waits, it does not spin or skip ahead
    b.put(0, "r0")
    assert b.take(0) == "r0"
    t.join(5)
    assert got == [2]


def test_workers_are_forked_only_where_that_is_safe(monkeypatch):
    """Forked (at once, with this process's modules) on Linux when no other thread runs and torch is
    not loaded; otherwise spawned: a lock held by another thread at the fork, torch's thread pools
    and CUDA, and macOS's libraries do not survive a fork."""
    import threading

    from alexcli.env import start_method

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert start_method() == "fork"
    monkeypatch.setattr(threading, "active_count", lambda: 2)  # the progress display's thread, say
    assert start_method() == "spawn"
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "torch", object())
    assert start_method() == "spawn"
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert start_method() == "spawn"


def test_the_command_forks_its_workers_before_its_progress_display_starts(tmp_path):
    """`alexcli prepare` on Linux: the pool is made before the progress bar's thread exists, so its
    workers are forked (no quarter-second import each) and this holds on the CLI's own path."""
    if not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    src = tmp_path / "src"
    make_demo(src, train_per_class=8, val_per_class=0, min_side=40, max_side=60, broken=False)
    probe = ("import multiprocessing, sys\n"
             "import alexcli.data.prepare as P\n"
             "real = P.mp.get_context\n"
             "P.mp.get_context = lambda m: (sys.stderr.write(f'start method {m}\\n'), real(m))[1]\n"
             "from alexcli.cli import main\n"
             "sys.argv = ['alexcli'] + sys.argv[1:]\n"
             "main()\n")
    r = subprocess.run([sys.executable, "-c", probe, "prepare", str(src), "--out", str(tmp_path / "out"), "--size", "32",
                        "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "start method fork" in r.stderr


def test_signals_are_ignored_only_while_a_worker_starts():
    import threading

    from alexcli.data.prepare import _sigint_ignored

    before = signal.getsignal(signal.SIGINT)
    with _sigint_ignored():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before
    seen = []
    t = threading.Thread(target=lambda: (_sigint_ignored().__enter__(), seen.append(signal.getsignal(signal.SIGINT))))
    t.start()
    t.join()
    assert seen == [before]  # only the main thread may set handlers: elsewhere nothing changes


@pytest.mark.skipif(not Path("/proc/self/fdinfo").exists(), reason="reads the workers' fds in /proc")
def test_a_forked_worker_holds_only_its_own_ends_of_its_own_pipes(pooled_src):
    """A fork copies every fd: unless a worker closes its copies of the parent's ends (of its own pipes
    and of the other workers'), its pipes never reach an end of file, and a worker whose parent was
    killed waits on them for ever where nothing else kills it."""
    import os
    import time

    import alexcli.data.prepare as P
    from alexcli.data.scan import scan

    src, _ = pooled_src
    cfg = PrepareConfig(size=32, shard_size=64)
    shards, _ = P.make_plan(scan(src), cfg)
    pool = P._Pool(list(P._tasks(shards)), 3, (str(src), cfg.image_params(), False), method="fork")
    try:
        pipes = [os.fstat(c.fileno()).st_ino for c in pool.conns]  # per worker: its task pipe, its result pipe

        def held(pid):  # {(pipe inode, access mode)} the process holds of the pool's pipes
            got = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
                    flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
                except (OSError, IndexError):
                    continue
                if ino in pipes:
                    got.add((ino, flags & os.O_ACCMODE))
            return got

        for k, proc in enumerate(pool.procs):
            own = {(pipes[2 * k], os.O_RDONLY), (pipes[2 * k + 1], os.O_WRONLY)}
            deadline = time.monotonic() + 30
            while held(proc.pid) != own and time.monotonic() < deadline:
                time.sleep(0.01)
            assert held(proc.pid) == own, k
    finally:
        pool.close()
