"""Odd sources: folders that cannot be listed, symlinks, FIFOs, devices, names that are not UTF-8,
empty classes. The promise: every entry found is written or listed in rejected.json with its reason,
the counts balance, and nothing hangs or ends in a traceback."""

import errno
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from alexcli.data import image
from alexcli.data.image import ImageParams, Reject, convert
from alexcli.data.prepare import PrepareConfig, prepare
from alexcli.data.scan import scan
from alexcli.errors import DataError
from conftest import run_cli
from test_scan import jpeg  # one small JPEG writer for both

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, symlinks and devices as on POSIX")


@pytest.fixture
def tree(tmp_path):
    """SRC/train/{a,b}/ with two JPEGs each; SRC is tmp_path/src (tmp_path/outside is for link targets)."""
    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(2):
            jpeg(src / "train" / c / f"{c}{i}.jpg")
    return src


def reasons(source):
    return {r["path"]: r["reason"] for r in source.rejected}


def listed(source, split="train"):
    return [it.relpath for it in source.splits[split]]


def deny_listing(monkeypatch, *folders):
    """Make listing FOLDERS fail with EACCES, as chmod 000 does for a user who is not root."""
    denied = {os.fspath(f) for f in folders}
    real_scandir, real_listdir = os.scandir, os.listdir

    def check(p):
        if not isinstance(p, int) and os.fspath(p) in denied:  # shutil.rmtree passes fds
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))

    def scandir(p="."):
        check(p)
        return real_scandir(p)

    def listdir(p="."):
        check(p)
        return real_listdir(p)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)


def prepare_small(src, out):
    return prepare(src, out, PrepareConfig(size=16, shard_size=8, workers=1))


def balanced(summary, out):
    rejected = json.loads((out / "rejected.json").read_text())
    assert summary["found"] == summary["written"] + summary["rejected"] == summary["written"] + len(rejected)
    for s in summary["splits"].values():
        assert s["found"] == s["written"] + s["rejected"]
    return {r["path"]: r["reason"] for r in rejected}


# ---------------------------------------------------------------- folders that cannot be listed

def test_unreadable_class_subfolder_is_a_reject_not_silence(tree, tmp_path, monkeypatch):
    jpeg(tree / "train" / "a" / "sub" / "deep.jpg")
    deny_listing(monkeypatch, tree / "train" / "a" / "sub")
    src = scan(tree)
    assert reasons(src) == {"train/a/sub": "unreadable folder: Permission denied"}
    assert src.found("train") == 5  # 4 images + the folder
    summary = prepare_small(tree, tmp_path / "out")
    assert balanced(summary, tmp_path / "out") == {"train/a/sub": "unreadable folder: Permission denied"}
    assert summary["splits"]["train"] == {"found": 5, "written": 4, "rejected": 1, "shards": 1}


def test_unreadable_class_folder_is_a_reject_and_an_empty_class(tree, monkeypatch):
    deny_listing(monkeypatch, tree / "train" / "b")
    src = scan(tree)
    assert src.classes == ["a", "b"]  # still a class: the labels of the others do not shift
    assert reasons(src) == {"train/b": "unreadable folder: Permission denied"}
    assert listed(src) == ["train/a/a0.jpg", "train/a/a1.jpg"]
    assert any(n.startswith("train/b: ") and "no training images" in n for n in src.notes), src.notes


def test_chmod_000_class_folder(tree):
    folder = tree / "train" / "b"
    folder.chmod(0)
    try:
        try:
            os.listdir(folder)
        except PermissionError:
            pass
        else:
            pytest.skip("chmod 000 does not stop this user (root) from listing; "
                        "test_unreadable_class_folder_is_a_reject_and_an_empty_class simulates it")
        assert reasons(scan(tree)) == {"train/b": "unreadable folder: Permission denied"}
    finally:
        folder.chmod(0o755)


def test_unreadable_train_folder_is_one_line_data_error(tree, monkeypatch):
    deny_listing(monkeypatch, tree / "train")
    with pytest.raises(DataError) as err:
        scan(tree)
    msg = str(err.value)
    assert str(tree / "train") in msg and "Permission denied" in msg and "\n" not in msg


def test_unreadable_val_folder_is_a_reject(tree, monkeypatch):
    jpeg(tree / "val" / "a" / "v.jpg")
    deny_listing(monkeypatch, tree / "val")
    src = scan(tree)
    assert src.splits["val"] == [] and reasons(src) == {"val": "unreadable folder: Permission denied"}
    assert src.found("val") == 1


def test_unreadable_train_folder_cli_is_exit_2_and_one_line(tree):
    # Root can list a chmod 000 folder, so the CLI runs with listing train/ made to fail.
    code = ("import errno, os, sys\n"
            "real = os.scandir, os.listdir\n"
            "def deny(f):\n"
            "    def g(p='.'):\n"
            "        if not isinstance(p, int) and os.fspath(p) == sys.argv[1]:\n"
            "            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))\n"
            "        return f(p)\n"
            "    return g\n"
            "os.scandir, os.listdir = map(deny, real)\n"
            "from alexcli.cli import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code, str(tree / "train"), "prepare", str(tree), "--out",
                        str(tree.parent / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: {tree / 'train'}: unreadable folder: Permission denied\n"


# ---------------------------------------------------------------- empty classes

def test_empty_class_folder_is_a_note(tree, tmp_path):
    (tree / "train" / "c").mkdir()
    src = scan(tree)
    assert src.classes == ["a", "b", "c"]
    assert src.notes == ["train/c: empty class folder: a class with no training images, "
                         "whose output the network is never trained on"]
    summary = prepare_small(tree, tmp_path / "out")
    assert summary["notes"] == src.notes


@posix_only
def test_class_with_only_odd_entries_is_a_note(tree):
    (tree / "train" / "c").mkdir()
    os.mkfifo(tree / "train" / "c" / "pipe.jpg")
    src = scan(tree)
    assert reasons(src) == {"train/c/pipe.jpg": "not a regular file (FIFO)"}
    assert src.notes == ["train/c: no usable files (1 rejected): a class with no training images, "
                         "whose output the network is never trained on"]


# ---------------------------------------------------------------- symlinks: followed at every depth

@posix_only
def test_symlinked_subfolder_is_followed_like_a_symlinked_class_folder(tree, tmp_path):
    jpeg(tmp_path / "outside" / "deep" / "x.jpg")
    jpeg(tmp_path / "outside" / "cls" / "y.jpg")
    (tree / "train" / "a" / "linked").symlink_to(tmp_path / "outside" / "deep", target_is_directory=True)
    (tree / "train" / "c").symlink_to(tmp_path / "outside" / "cls", target_is_directory=True)
    src = scan(tree)
    assert src.classes == ["a", "b", "c"] and src.rejected == []
    assert listed(src) == ["train/a/a0.jpg", "train/a/a1.jpg", "train/a/linked/x.jpg",
                           "train/b/b0.jpg", "train/b/b1.jpg", "train/c/y.jpg"]


@posix_only
def test_symlinked_folder_loop_is_a_reject(tree):
    (tree / "train" / "a" / "up").symlink_to("..", target_is_directory=True)  # train/a/up -> train/
    (tree / "train" / "b" / "self").symlink_to(".", target_is_directory=True)
    (tree / "train" / "c").symlink_to("..", target_is_directory=True)  # a class folder -> SRC
    src = scan(tree)
    assert reasons(src) == {"train/a/up": "symlink loop: leads back to train",
                            "train/b/self": "symlink loop: leads back to train/b",
                            "train/c": "symlink loop: leads back to the source folder"}
    assert len(src.splits["train"]) == 4


@posix_only
def test_second_link_to_a_listed_folder_is_a_reject(tree, tmp_path):
    jpeg(tmp_path / "outside" / "shared" / "s.jpg")
    for c in ("a", "b"):
        (tree / "train" / c / "shared").symlink_to(tmp_path / "outside" / "shared", target_is_directory=True)
    src = scan(tree)
    assert reasons(src) == {"train/b/shared": "folder already listed as train/a/shared"}
    assert "train/a/shared/s.jpg" in listed(src) and "train/b/shared/s.jpg" not in listed(src)


@posix_only
def test_dangling_symlink_and_symlink_loop_are_rejects(tree):
    (tree / "train" / "a" / "gone.jpg").symlink_to(tree / "nowhere.jpg")
    (tree / "train" / "a" / "loop1.jpg").symlink_to("loop2.jpg")
    (tree / "train" / "a" / "loop2.jpg").symlink_to("loop1.jpg")
    (tree / "train" / "stray").symlink_to(tree / "nothing")  # in train/ itself
    src = scan(tree)
    assert reasons(src) == {"train/a/gone.jpg": "dangling symlink", "train/a/loop1.jpg": "symlink loop",
                            "train/a/loop2.jpg": "symlink loop", "train/stray": "dangling symlink"}
    assert src.classes == ["a", "b"] and src.found("train") == 8


@posix_only
def test_symlink_to_a_regular_file_is_read(tree, tmp_path):
    jpeg(tmp_path / "outside" / "real.jpg")
    (tree / "train" / "a" / "link.jpg").symlink_to(tmp_path / "outside" / "real.jpg")
    src = scan(tree)
    assert "train/a/link.jpg" in listed(src) and src.rejected == []
    item = next(it for it in src.splits["train"] if it.relpath == "train/a/link.jpg")
    assert item.nbytes == (tmp_path / "outside" / "real.jpg").stat().st_size  # the target's size


# ---------------------------------------------------------------- entries that are not regular files

@posix_only
def test_fifo_is_rejected_by_scan_without_opening_it(tree):
    os.mkfifo(tree / "train" / "a" / "pipe.jpg")
    os.mkfifo(tree / "train" / "loose_pipe")
    src = scan(tree)  # opening the FIFO would block here: scan only stats
    assert reasons(src) == {"train/a/pipe.jpg": "not a regular file (FIFO)",
                            "train/loose_pipe": "not a regular file (FIFO)"}


@posix_only
def test_odd_entries_of_a_skipped_flat_val_are_counted_in_its_note(tree):
    jpeg(tree / "val" / "x.jpg")
    os.mkfifo(tree / "val" / "pipe")
    src = scan(tree)
    assert "val" not in src.splits and src.rejected == []  # no reject may name a split that is not there
    assert src.notes[0].startswith("val/ skipped: 1 files in a flat folder (and 1 entries that are not "
                                   "regular files) with no labels")


@posix_only
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_rejected(tree):
    (tree / "train" / "a" / "zero.jpg").symlink_to("/dev/zero")
    assert reasons(scan(tree)) == {"train/a/zero.jpg": "not a regular file (character device)"}


@posix_only
def test_prepare_cli_with_fifo_and_dev_zero_finishes_and_balances(tree, tmp_path):
    os.mkfifo(tree / "train" / "a" / "pipe.jpg")
    if os.path.exists("/dev/zero"):
        (tree / "train" / "b" / "zero.jpg").symlink_to("/dev/zero")
    out = tmp_path / "out"
    r = run_cli("prepare", tree, "--out", out, "--size", "16", "--workers", "1", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    got = balanced(summary, out)
    assert got["train/a/pipe.jpg"] == "not a regular file (FIFO)"
    assert summary["written"] == 4


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses names that are not UTF-8")
def test_file_name_not_utf8_is_a_reject_with_a_json_safe_path(tree, tmp_path):
    folder = os.fsencode(tree / "train" / "a")
    try:
        fd = os.open(folder + b"/\xff\xfe.jpg", os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        pytest.skip(f"this file system refuses names that are not UTF-8: {exc}")
    os.write(fd, (tree / "train" / "a" / "a0.jpg").read_bytes())
    os.close(fd)
    src = scan(tree)
    assert reasons(src) == {"train/a/\ufffd\ufffd.jpg": "file name is not valid UTF-8"}
    json.dumps(src.rejected, ensure_ascii=False).encode("utf-8")  # writable as UTF-8 JSON
    summary = prepare_small(tree, tmp_path / "out")
    assert balanced(summary, tmp_path / "out") == {"train/a/\ufffd\ufffd.jpg": "file name is not valid UTF-8"}


# ---------------------------------------------------------------- reading one source file

def test_read_source_reads_a_regular_file(tmp_path):
    p = tmp_path / "f.jpg"
    p.write_bytes(b"abc" * 1000)
    assert image.read_source(p, 3000) == b"abc" * 1000
    assert image.MAX_SOURCE_BYTES >= 64 * 2**20  # well above the largest photo


def test_read_source_size_limit(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(b"x" * 101)
    with pytest.raises(Reject, match=r"^file too large: 101 bytes exceeds the limit of 100$"):
        image.read_source(p, 100)


@posix_only
def test_read_source_fifo_does_not_hang(tmp_path):
    p = tmp_path / "pipe.jpg"
    os.mkfifo(p)  # no writer: a blocking open would wait forever
    with pytest.raises(Reject, match=r"^not a regular file \(FIFO\)$"):
        image.read_source(p, 100)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_read_source_device_is_not_read(tmp_path):
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with pytest.raises(Reject, match=r"^not a regular file \(character device\)$"):
        image.read_source(tmp_path / "zero.jpg", image.MAX_SOURCE_BYTES)


def test_read_source_directory_and_missing(tmp_path):
    with pytest.raises(Reject, match=r"^not a regular file \(directory\)$"):
        image.read_source(tmp_path, 100)
    with pytest.raises(Reject, match=r"^unreadable: No such file or directory$"):
        image.read_source(tmp_path / "missing.jpg", 100)


# ---------------------------------------------------------------- 32-bit TIFFs (modes F and I)

def tiff(arr):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "TIFF")
    return b.getvalue()


def ramp(lo, hi, dtype, n=64):
    """A smooth n x n ramp from lo to hi: JPEG keeps it within a level or two."""
    yy, xx = np.mgrid[0:n, 0:n]
    return (lo + (hi - lo) * (xx + yy) / (2 * n - 2)).astype(dtype)


def written_grey(data, n=64):
    jpg, info = convert(data, ImageParams(size=n, quality=95))
    px = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(float)
    return px.mean(axis=2), info


@pytest.mark.parametrize("lo,hi,dtype,mode,reference", [
    (0.0, 1.0, np.float32, "F", lambda a: a * 255),  # a float image in 0..1
    (0.0, 255.0, np.float32, "F", lambda a: a),  # a float image on the 8-bit scale
    (-1000.0, 3000.0, np.float32, "F", lambda a: (a + 1000) / 4000 * 255),  # anything else: own min..max
    (0, 60000, np.int32, "I", lambda a: a // 256),  # 16-bit range: the top 8 bits
    (-50000, 2_000_000, np.int32, "I", lambda a: (a + 50000) / 2_050_000 * 255),  # own min..max
])
def test_32bit_tiff_greys_are_scaled_not_clipped(lo, hi, dtype, mode, reference):
    a = ramp(lo, hi, dtype)
    got, info = written_grey(tiff(a))
    assert info["mode"] == mode and info["format"] == "TIFF"
    ref = reference(a.astype(np.float64))
    assert np.abs(got - ref).mean() < 3, (got.min(), got.max(), ref.min(), ref.max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_inf_is_rejected(bad):
    a = ramp(0.0, 1.0, np.float32)
    a[3, 5] = bad
    with pytest.raises(Reject, match=r"^float image with NaN or infinite pixel values$"):
        convert(tiff(a), ImageParams(size=16))


@posix_only
def test_worker_rejects_a_fifo_that_appears_after_scan_and_a_file_over_the_limit(tree, tmp_path, monkeypatch):
    from alexcli.data import image
    from alexcli.data import prepare as P

    real = P.scan

    def scan_then_swap(src):  # the tree changes between scan and read
        s = real(src)
        os.unlink(tree / "train" / "a" / "a0.jpg")
        os.mkfifo(tree / "train" / "a" / "a0.jpg")
        return s

    monkeypatch.setattr(P, "scan", scan_then_swap)
    monkeypatch.setattr(image, "MAX_SOURCE_BYTES", 700)  # the workers' reader takes the limit from here
    noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tree / "train" / "b" / "big.png")  # ~4.8 kB of noise
    summary = prepare_small(tree, tmp_path / "out")
    got = balanced(summary, tmp_path / "out")
    size = (tree / "train" / "b" / "big.png").stat().st_size
    assert got == {"train/a/a0.jpg": "not a regular file (FIFO)",
                   "train/b/big.png": f"file too large: {size} bytes exceeds the limit of 700"}
