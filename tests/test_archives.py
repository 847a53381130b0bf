"""prepare straight from the archives as downloaded (alexcli.data.archives): ILSVRC-2012's tars, the
Kaggle zip, CIFAR-10/100 in python and binary form. Each is built here from small generated images
and checked against the same images as an extracted folder tree: the same samples in every shard,
the same labels, the same statistics."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexcli.data import archives as A
from alexcli.data.demo import CLASSES, make_demo
from alexcli.data.image import Reject
from alexcli.data.prepare import PrepareConfig, prepare
from alexcli.data.scan import scan
from alexcli.errors import DataError, UsageError
from conftest import run_here

CFG = dict(size=32, shard_size=16, workers=1, seed=3)
WNIDS = sorted(CLASSES)  # the demo's class folders stand in for wnids
WORDS = {c: f"{c}, the {c} class" for c in WNIDS}


# ---------------------------------------------------------------- helpers

def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)


def tar_of(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            add(tar, name, data)
    return buf.getvalue()


def shard_samples(out: Path) -> dict:
    """split -> [[(jpg, cls) of each sample] of each shard], read with plain tarfile."""
    manifest = json.loads((out / "dataset.json").read_text())
    got = {}
    for split, s in manifest["splits"].items():
        got[split] = []
        for entry in s["shards"]:
            samples: dict = {}
            with tarfile.open(out / entry["name"]) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
            got[split].append([(v["jpg"], v["cls"]) for v in samples.values()])
    return got


def stats_tensors(out: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(out / "stats.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k).tobytes() for k in f.keys()}


def assert_same_data(a: Path, b: Path) -> None:
    """Two prepared data sets hold the same samples, labels, classes and statistics."""
    ma, mb = (json.loads((o / "dataset.json").read_text()) for o in (a, b))
    assert ma["classes"] == mb["classes"] and ma["class_names"] == mb["class_names"]
    for split in ma["splits"]:
        for k in ("found", "written", "rejected"):
            assert ma["splits"][split][k] == mb["splits"][split][k], (split, k)
    assert ma["splits"].keys() == mb["splits"].keys()
    sa, sb = shard_samples(a), shard_samples(b)
    assert sa == sb
    assert sum(len(sh) for sp in sa.values() for sh in sp) > 0
    assert stats_tensors(a) == stats_tensors(b)
    reasons = [sorted((r["path"].rsplit("/", 1)[1], r["reason"]) for r in json.loads((o / "rejected.json").read_text()))
               for o in (a, b)]
    assert reasons[0] == reasons[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, train_per_class=5, val_per_class=2, seed=7, min_side=24, max_side=64, broken=True)
    return root


# ---------------------------------------------------------------- ILSVRC-2012's tars

def _devkit_files(val_wnids: list[str]) -> dict[str, bytes]:
    """meta.mat (in the devkit's shape: IDs not in wnid order, extra non-leaf synsets) and the ground truth."""
    import scipy.io

    ids = {c: i + 1 for i, c in enumerate(random.Random(5).sample(WNIDS, len(WNIDS)))}
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
              ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(ids[c], c, WORDS[c], f"a {c}", 0, np.zeros((1, 0)), 0, 5) for c in sorted(WNIDS, key=ids.get)]
    rows.append((len(rows) + 1, "n99999999", "shape", "a parent synset", 2, np.array([1, 2]), 1, 0))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": np.array(rows, dtype=fields)})
    gt = "".join(f"{ids[w]}\n" for w in val_wnids)
    return {"ILSVRC2012_devkit_t12/data/meta.mat": buf.getvalue(),
            "ILSVRC2012_devkit_t12/data/" + A.GROUND_TRUTH: gt.encode(),
            "ILSVRC2012_devkit_t12/COPYING": b"devkit licence\n"}


@pytest.fixture(scope="module")
def ilsvrc(demo, tmp_path_factory):
    """(extracted tree, folder of the three downloads) holding the same images."""
    base = tmp_path_factory.mktemp("ilsvrc")
    tree, arch = base / "tree", base / "arch"
    shutil.copytree(demo / "train", tree / "train")
    first = tree / "train" / WNIDS[0] / f"{WNIDS[0]}_0000.JPEG"
    shutil.copy(first, tree / "train" / WNIDS[0] / (WNIDS[0] + "_" + "long" * 30 + ".JPEG"))  # a GNU long name
    shutil.copy(first, tree / "train" / WNIDS[1] / "caf\u00e9.JPEG")  # a pax header (non-ASCII name)
    (tree / "train" / WNIDS[2] / ("._" + first.name)).write_bytes(b"\0\5AppleDouble")
    (tree / "train" / ".DS_Store").write_bytes(b"junk")
    # val: the demo's val images renumbered in a shuffled order, labelled by the devkit
    val = sorted((p.parent.name, p) for p in (demo / "val").rglob("*.JPEG"))
    random.Random(1).shuffle(val)
    (tree / "val").mkdir()
    val_names = []
    for k, (_, p) in enumerate(val, 1):
        val_names.append(f"ILSVRC2012_val_{k:08d}.JPEG")
        shutil.copy(p, tree / "val" / val_names[-1])
    (tree / "val" / ".DS_Store").write_bytes(b"junk")
    kit = _devkit_files([w for w, _ in val])
    for rel, data in kit.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)

    arch.mkdir()
    formats = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]
    with tarfile.open(arch / A.TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        add(outer, ".DS_Store", b"junk")
        for k, c in random.Random(2).sample(list(enumerate(WNIDS)), len(WNIDS)):  # not in sorted order
            files = sorted((tree / "train" / c).iterdir(), reverse=True)  # nor are the members
            add(outer, c + ".tar", tar_of([(f.name, f.read_bytes()) for f in files], formats[k % 3]))
    with tarfile.open(arch / A.VAL_TAR, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in random.Random(3).sample(val_names, len(val_names)) + [".DS_Store"]:
            add(tar, name, (tree / "val" / name).read_bytes())
    with tarfile.open(arch / A.DEVKIT_TGZ, "w:gz") as tar:
        for rel, data in kit.items():
            add(tar, rel, data)
    out_tree, out_arch = base / "out-tree", base / "out-arch"
    summaries = prepare(tree, out_tree, PrepareConfig(**CFG)), prepare(arch, out_arch, PrepareConfig(**CFG))
    return tree, arch, out_tree, out_arch, summaries


def test_ilsvrc_tars_prepare_as_the_extracted_tree(ilsvrc):
    tree, arch, out_tree, out_arch, (s_tree, s_arch) = ilsvrc
    assert_same_data(out_tree, out_arch)
    manifest = json.loads((out_arch / "dataset.json").read_text())
    assert manifest["classes"] == WNIDS
    assert manifest["class_names"] == [WORDS[c] for c in WNIDS]
    assert s_arch["class_names_from"] == "the devkit's meta.mat in ILSVRC2012_devkit_t12.tar.gz"
    assert s_arch["splits"]["val"]["written"] == len(CLASSES) * 2
    assert s_arch["splits"]["train"]["rejected"] == 3  # the demo's broken files, rejected by the workers
    assert s_tree["skipped"] == s_arch["skipped"] == 3
    paths = [json.loads(m["json"])["path"] for m in _jsons(out_arch, "val")]
    assert paths == sorted(paths) and paths[0] == "ILSVRC2012_img_val.tar/ILSVRC2012_val_00000001.JPEG"
    train = {json.loads(m["json"])["path"] for m in _jsons(out_arch, "train")}
    assert f"ILSVRC2012_img_train.tar/{WNIDS[1]}.tar/caf\u00e9.JPEG" in train
    assert f"ILSVRC2012_img_train.tar/{WNIDS[0]}.tar/{WNIDS[0]}_{'long' * 30}.JPEG" in train


def _jsons(out: Path, split: str):
    manifest = json.loads((out / "dataset.json").read_text())
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    yield {"json": tar.extractfile(m).read()}


def test_the_train_tar_as_src_finds_its_siblings_and_alone_has_no_val(ilsvrc, tmp_path):
    tree, arch, *_ = ilsvrc
    whole = scan(arch)
    as_file = scan(arch / A.TRAIN_TAR)
    assert as_file.root == arch / A.TRAIN_TAR
    assert as_file.splits == whole.splits and as_file.class_names == whole.class_names
    extracted = scan(tree)
    for split in ("train", "val"):
        assert [(Path(i.relpath).name, i.label, i.nbytes) for i in whole.splits[split]] == \
               [(Path(i.relpath).name, i.label, i.nbytes) for i in extracted.splits[split]]
    alone = tmp_path / "alone"
    alone.mkdir()
    os.symlink(arch / A.TRAIN_TAR, alone / A.TRAIN_TAR)
    src = scan(alone)
    assert list(src.splits) == ["train"] and src.splits["train"] == whole.splits["train"]
    assert src.notes == [f"no {A.VAL_TAR} beside {A.TRAIN_TAR}: no val split"]
    assert src.class_names == WNIDS  # no devkit: the wnids


def test_class_tars_listed_by_threads_give_the_same_items(ilsvrc, monkeypatch):
    _, arch, *_ = ilsvrc
    one = scan(arch)
    monkeypatch.setattr(A, "SLOW_HEADER_S", 0.0)  # as if every read waited on storage
    monkeypatch.setattr(A, "LISTING_THREADS", 3)
    assert scan(arch).splits == one.splits


def test_a_cut_train_tar_keeps_what_was_listed_before_the_cut(ilsvrc, tmp_path):
    _, arch, *_ = ilsvrc
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (arch / A.TRAIN_TAR).read_bytes()
    fd = os.open(arch / A.TRAIN_TAR, os.O_RDONLY)
    try:
        outer, _ = A.walk_tar(fd, 0, len(data), len(data), need_end=True)
        class_tars = [m for m in outer if m.name.endswith(".tar")]
        victim = class_tars[4]
        members, _ = A.walk_tar(fd, victim.offset, victim.size, victim.size)
    finally:
        os.close(fd)
    at = members[2].offset + members[2].size // 2  # inside the third member's data
    (cut / A.TRAIN_TAR).write_bytes(data[:at])
    src = scan(cut)
    wnid = victim.name[:-4]
    assert src.classes == sorted(m.name[:-4] for m in class_tars[:5])
    mine = [i for i in src.splits["train"] if i.label == src.classes.index(wnid)]
    assert sorted(Path(i.relpath).name for i in mine) == sorted(m.name for m in members[:2])
    reasons = {r["path"]: r["reason"] for r in src.rejected}
    assert reasons[f"{A.TRAIN_TAR}/{wnid}.tar/{members[2].name}"].startswith("truncated archive")
    assert reasons[f"{A.TRAIN_TAR}/{wnid}.tar"].startswith(f"truncated archive: the file ends at byte {at}")
    assert reasons[A.TRAIN_TAR].startswith("truncated archive") and f"classes after {wnid}.tar" in reasons[A.TRAIN_TAR]
    assert len(src.rejected) == 3 and src.warnings and "only the 5 classes" in src.warnings[0]

    r = run_here("prepare", cut, "--out", tmp_path / "o", "--size", 16, "--workers", 1, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["found"] == summary["written"] + summary["rejected"]
    assert summary["splits"]["train"]["rejected"] == 3 + sum(b.startswith("broken") for b in
                                                             (Path(i.relpath).name for i in src.splits["train"]))
    assert "download it again" in summary["warnings"][0]
    listed = {r["path"] for r in json.loads((tmp_path / "o" / "rejected.json").read_text())}
    assert set(reasons) <= listed
    r = run_here("prepare", cut, "--out", tmp_path / "o2", "--size", 16, "--workers", 1, "--strict")
    assert r.returncode == 1 and "--strict" in r.stderr and "Traceback" not in r.stderr


def test_a_member_cut_after_listing_is_a_reject_in_the_worker(ilsvrc, tmp_path, monkeypatch):
    _, arch, *_ = ilsvrc
    shutil.copy(arch / A.TRAIN_TAR, tmp_path / A.TRAIN_TAR)
    src = scan(tmp_path / A.TRAIN_TAR)
    item = max(src.splits["train"], key=lambda i: i.where[2])  # the last member in the file
    reader = A.ItemReader(src.root)
    try:
        assert reader.read(item) == _member_bytes(arch / A.TRAIN_TAR, item)
        with open(tmp_path / A.TRAIN_TAR, "r+b") as f:
            f.truncate(item.where[2] + 10)
        with pytest.raises(Reject, match="truncated archive: ILSVRC2012_img_train.tar ends"):
            reader.read(item)
        from alexcli.data import image

        monkeypatch.setattr(image, "MAX_SOURCE_BYTES", 9)
        with pytest.raises(Reject, match=f"file too large: {item.nbytes} bytes exceeds the limit of 9"):
            reader.read(item)
    finally:
        reader.close()
    assert reader._fds == {}


def _member_bytes(tar_path: Path, item) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(item.where[2])
        return f.read(item.nbytes)


def test_odd_members_of_a_class_tar(tmp_path):
    jpg = _jpeg((1, 2, 3))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as inner:
        add(inner, "b.JPEG", jpg)
        add(inner, "sub", type=tarfile.DIRTYPE)
        add(inner, "sub/deep/c.JPEG", jpg)
        add(inner, "sub/a.JPEG", jpg)
        add(inner, "./a.JPEG", jpg)
        add(inner, "link.JPEG", type=tarfile.SYMTYPE, linkname="b.JPEG")
        add(inner, "fifo", type=tarfile.FIFOTYPE)
        add(inner, "._b.JPEG", b"\0\5")
        add(inner, ".cache/x.JPEG", jpg)
        add(inner, ".cache/y.JPEG", jpg)
        add(inner, "z.JPEG", b"old")
        add(inner, "z.JPEG", jpg)  # a later member of the same name wins, as extracting would
    corrupt = bytearray(tar_of([("a.JPEG", jpg), ("b.JPEG", jpg), ("c.JPEG", jpg)]))
    second = 512 + -(-len(jpg) // 512) * 512
    corrupt[second:second + 512] = b"\x07" * 512  # the second header: garbage
    with tarfile.open(tmp_path / A.TRAIN_TAR, "w") as outer:
        add(outer, "n1.tar", buf.getvalue())
        add(outer, "notes.txt", b"x")
        add(outer, "n0.tar", tar_of([]))
        add(outer, "n2.tar", bytes(corrupt))
    src = scan(tmp_path)
    assert src.classes == ["n0", "n1", "n2"]
    n2 = [i.relpath for i in src.splits["train"] if i.label == 2]
    assert n2 == ["ILSVRC2012_img_train.tar/n2.tar/a.JPEG"]  # what was listed before the damage
    assert [i.relpath.split("n1.tar/")[1] for i in src.splits["train"] if i.label == 1] == [
        "a.JPEG", "b.JPEG", "z.JPEG", "sub/a.JPEG", "sub/deep/c.JPEG"]  # os.walk's order
    assert src.skipped == {"train": 2}  # ._b.JPEG and the .cache folder, as scan counts them
    assert {r["path"]: r["reason"] for r in src.rejected} == {
        "ILSVRC2012_img_train.tar/notes.txt": "not a class tar (expected <wnid>.tar)",
        "ILSVRC2012_img_train.tar/n1.tar/link.JPEG": "not a regular file (symbolic link to b.JPEG)",
        "ILSVRC2012_img_train.tar/n1.tar/fifo": "not a regular file (FIFO)",
        "ILSVRC2012_img_train.tar/n1.tar/z.JPEG": "a later member of the same name replaces it (as extracting would)",
        "ILSVRC2012_img_train.tar/n2.tar": f"damaged tar: no valid header at byte {n2_offset(src) + second}; "
                                           "1 members listed before it",
    }
    assert any("n0.tar: no usable files" in n for n in src.notes)
    reader = A.ItemReader(src.root)
    assert [reader.read(i) for i in src.splits["train"]] == [jpg] * 6
    reader.close()


def n2_offset(src) -> int:
    """Where n2.tar's data starts in the train tar: its first member's data offset less one header."""
    return next(i.where[2] for i in src.splits["train"] if i.label == 2) - 512


# ---------------------------------------------------------------- the tar header walk

def _crafted_base256(name: str, data: bytes) -> bytes:
    """One GNU member whose size field is in base-256 (as GNU tar writes sizes of 8 GB and more)."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    hdr = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    hdr[124:136] = b"\x80" + len(data).to_bytes(11, "big")
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % (sum(hdr))
    return bytes(hdr) + data + bytes(-len(data) % 512) + bytes(1024)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_walk_tar_lists_what_tarfile_lists(tmp_path, fmt):
    path = tmp_path / "t.tar"
    long_name = "deep/" * 12 + "x" * 40 + ".JPEG"  # over 100 bytes: ustar's prefix, GNU's L, pax's path
    with tarfile.open(path, "w", format=fmt, pax_headers={"comment": "global"} if fmt == tarfile.PAX_FORMAT else None) as tar:
        for name, size in (("empty", 0), ("one", 1), ("block", 512), ("block+1", 513), (long_name, 700)):
            add(tar, name, bytes(range(256)) * (size // 256) + bytes(size % 256))
        add(tar, "dir", type=tarfile.DIRTYPE)
        add(tar, "sym", type=tarfile.SYMTYPE, linkname="one")
        add(tar, "hard", type=tarfile.LNKTYPE, linkname="one")
        add(tar, "fifo", type=tarfile.FIFOTYPE)
        add(tar, "chr", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        if fmt != tarfile.USTAR_FORMAT:
            add(tar, "caf\u00e9/\u00fcber.JPEG", b"abc")
            add(tar, "l" * 120, type=tarfile.SYMTYPE, linkname="t" * 130)
    kinds = {"isreg": "file", "isdir": "directory", "issym": "symbolic link to ", "islnk": "hard link to ",
             "isfifo": "FIFO", "ischr": "character device"}
    for blob in (path.read_bytes(), _crafted_base256("big", b"12345")):
        path.write_bytes(blob)
        with tarfile.open(path) as tar:
            want = []
            for m in tar:
                kind = next(v for k, v in kinds.items() if getattr(m, k)())
                kind += m.linkname if kind.endswith(" to ") else ""
                want.append((m.name, kind, m.offset_data, m.size))
        fd = os.open(path, os.O_RDONLY)
        try:
            got, damage = A.walk_tar(fd, 0, len(blob), len(blob), need_end=True)
        finally:
            os.close(fd)
        assert damage is None
        assert [(m.name, m.kind, m.offset, m.size) for m in got] == want
        assert all(m.complete for m in got)


def test_walk_tar_says_where_a_damaged_tar_stops(tmp_path):
    blob = bytearray(tar_of([(f"f{i}", b"x" * 600) for i in range(4)]))
    fd_path = tmp_path / "t.tar"

    def walk(data):
        fd_path.write_bytes(bytes(data))
        fd = os.open(fd_path, os.O_RDONLY)
        try:
            return A.walk_tar(fd, 0, len(data), len(data), need_end=True)
        finally:
            os.close(fd)

    third = 2 * (512 + 1024)
    bad = blob.copy()
    bad[third + 10] ^= 0xFF  # the third header's checksum no longer holds
    members, damage = walk(bad)
    assert [m.name for m in members] == ["f0", "f1"]
    assert damage == f"damaged tar: no valid header at byte {third}"
    members, damage = walk(blob[:third + 512 + 100])  # cut inside the third member's data
    assert [m.complete for m in members] == [True, True, False]
    assert damage == f"truncated archive: the file ends at byte {third + 612}, inside f2"
    members, damage = walk(blob[:4 * 1536])  # cut where the end-of-archive blocks start
    assert len(members) == 4 and damage.startswith("truncated archive")
    assert walk(b"not a tar" * 100) == ([], "not a tar archive")


# ---------------------------------------------------------------- the Kaggle zip

@pytest.fixture(scope="module")
def kaggle(demo, tmp_path_factory):
    base = tmp_path_factory.mktemp("kaggle")
    tree = base / "tree"
    cls_loc = tree / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(demo / "train", cls_loc / "train")
    (cls_loc / "val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for k, p in enumerate(sorted((demo / "val").rglob("*.JPEG")), 1):
        shutil.copy(p, cls_loc / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{k:08d},{p.parent.name} 1 2 3 4 {p.parent.name} 5 6 7 8")
    (cls_loc / "test").mkdir()
    shutil.copy(p, cls_loc / "test" / "ILSVRC2012_test_00000001.JPEG")
    (tree / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (tree / "LOC_synset_mapping.txt").write_text("".join(f"{c} {WORDS[c]}\n" for c in WNIDS))
    zpath = base / "zip" / A.KAGGLE_ZIP
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(tree.rglob("*"), reverse=True):
            zf.write(p, p.relative_to(tree).as_posix())
    out_tree, out_zip = base / "out-tree", base / "out-zip"
    summaries = prepare(tree, out_tree, PrepareConfig(**CFG)), prepare(zpath, out_zip, PrepareConfig(**CFG))
    return tree, zpath, out_tree, out_zip, summaries


def test_kaggle_zip_prepares_as_the_extracted_tree(kaggle):
    tree, zpath, out_tree, out_zip, (s_tree, s_zip) = kaggle
    assert_same_data(out_tree, out_zip)
    assert s_zip["class_names_from"] == f"LOC_synset_mapping.txt in {A.KAGGLE_ZIP}"
    assert s_tree["class_names_from"] == "LOC_synset_mapping.txt"
    assert json.loads((out_zip / "dataset.json").read_text())["class_names"] == [WORDS[c] for c in WNIDS]
    assert list(s_zip["splits"]) == ["train", "val"] and s_zip["splits"]["val"]["written"] == 16
    assert any(n.startswith("test/ skipped: 1 files in a flat folder with no labels") for n in s_zip["notes"])
    # the same items and labels from the folder holding the zip, the zip and the tree
    a, b, c = scan(zpath.parent), scan(zpath), scan(tree)
    assert a.splits == b.splits
    prefix = A.KAGGLE_ZIP + "/"
    for split in ("train", "val"):
        assert [(i.relpath, i.label, i.nbytes) for i in b.splits[split]] == \
               [(prefix + i.relpath, i.label, i.nbytes) for i in c.splits[split]]


def test_a_flipped_byte_in_a_zip_member_is_a_crc_mismatch(kaggle, tmp_path):
    _, zpath, *_ = kaggle
    bad = tmp_path / A.KAGGLE_ZIP
    data = bytearray(zpath.read_bytes())
    src = scan(zpath)
    item = max(src.splits["train"], key=lambda i: i.where[3])
    _, _, offset, csize, method, crc = item.where
    assert method == zipfile.ZIP_DEFLATED
    name_len, extra_len = (int(v) for v in np.frombuffer(bytes(data[offset + 26:offset + 30]), "<u2"))
    start = offset + 30 + name_len + extra_len
    for at in range(start + csize // 2, start + csize):  # a flip that still inflates, to other bytes
        flipped = bytearray(data[start:start + csize])
        flipped[at - start] ^= 0x01
        try:
            d = zlib.decompressobj(-15)
            raw = d.decompress(bytes(flipped))
        except zlib.error:
            continue
        if d.eof and len(raw) == item.nbytes and zlib.crc32(raw) != crc:
            data[at] ^= 0x01
            break
    else:
        pytest.fail("no byte to flip")
    bad.write_bytes(bytes(data))
    summary = prepare(bad, tmp_path / "o", PrepareConfig(**CFG))
    assert summary["found"] == summary["written"] + summary["rejected"]
    reasons = {r["path"]: r["reason"] for r in json.loads((tmp_path / "o" / "rejected.json").read_text())}
    assert reasons[item.relpath] == "zip member CRC mismatch: its data is corrupt"
    bad.write_bytes(bytes(data[:len(data) // 2]))  # cut: no central directory
    with pytest.raises(DataError, match=f"{A.KAGGLE_ZIP}: not a zip, or cut short"):
        scan(bad)


def test_zip_members_over_the_size_limit_and_cut_zips_are_rejects(kaggle, tmp_path, monkeypatch):
    _, zpath, *_ = kaggle
    shutil.copy(zpath, tmp_path / A.KAGGLE_ZIP)
    src = scan(tmp_path / A.KAGGLE_ZIP)
    item = src.splits["train"][0]
    reader = A.ItemReader(src.root)
    with zipfile.ZipFile(zpath) as zf:
        assert reader.read(item) == zf.read(item.relpath.split("/", 1)[1])
    from alexcli.data import image

    monkeypatch.setattr(image, "MAX_SOURCE_BYTES", 10)
    with pytest.raises(Reject, match="file too large"):
        reader.read(item)
    monkeypatch.undo()
    with open(tmp_path / A.KAGGLE_ZIP, "r+b") as f:
        f.truncate(item.where[2] + 40)
    with pytest.raises(Reject, match="truncated archive"):
        reader.read(item)
    reader.close()


# ---------------------------------------------------------------- CIFAR

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images(n: int, classes: int, seed: int):
    """N random 32x32 images (HWC), labels covering every class, CIFAR-like file names."""
    rng = np.random.default_rng(seed)
    labels = (list(range(classes)) * (n // classes + 1))[:n]
    rng.shuffle(labels)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    names = [f"{'abcdefgh'[int(rng.integers(8))]}_s_{int(rng.integers(10 ** 6)):06d}_{seed}_{k}.png" for k in range(n)]
    return images, [int(v) for v in labels], names


def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> CIFAR's rows: the red plane, then green, then blue, each row-major 32x32."""
    return np.stack([np.concatenate([im[:, :, c].ravel() for c in range(3)]) for im in images])


def _png_tree(root: Path, split: str, images, labels, names, classes) -> None:
    for im, label, name in zip(images, labels, names):
        p = root / split / classes[label] / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)


def _write_tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            add(tar, name, data)


def _cifar10(base: Path, binary: bool):
    """cifar-10-{python,binary}.tar.gz with 5 batches of 12 and a test batch of 10, and its PNG tree."""
    batches = [_cifar_images(12, 10, k) for k in range(5)]
    test = _cifar_images(10, 10, 9)
    tree = base / "tree"
    if binary:
        folder, files = "cifar-10-batches-bin", {}
        for k, (ims, labels, _) in enumerate(batches + [test]):
            name = f"data_batch_{k + 1}.bin" if k < 5 else "test_batch.bin"
            recs = np.concatenate([np.array(labels, np.uint8)[:, None], _rows(ims)], axis=1)
            files[f"{folder}/{name}"] = recs.tobytes()
            names = [f"{name}_{i:05d}.png" for i in range(len(ims))]  # sorts as the archive's name/00042
            _png_tree(tree, "train" if k < 5 else "test", ims, labels, names, CIFAR10_NAMES)
        files[f"{folder}/batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n\n").encode()
        tgz = base / "cifar-10-binary.tar.gz"
    else:
        folder, files = "cifar-10-batches-py", {"cifar-10-batches-py/readme.html": b"<html>"}
        for k, (ims, labels, names) in enumerate(batches + [test]):
            name = f"data_batch_{k + 1}" if k < 5 else "test_batch"
            batch = {b"batch_label": f"batch {k}".encode(), b"labels": labels, b"data": _rows(ims),
                     b"filenames": [n.encode() for n in names]}
            files[f"{folder}/{name}"] = pickle.dumps(batch, protocol=2)
            _png_tree(tree, "train" if k < 5 else "test", ims, labels, names, CIFAR10_NAMES)
        files[f"{folder}/batches.meta"] = pickle.dumps(
            {b"num_cases_per_batch": 12, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072},
            protocol=2)
        tgz = base / "cifar-10-python.tar.gz"
    _write_tgz(tgz, files)
    return tgz, tree, files


def _cifar100(base: Path):
    """cifar-100-python.tar.gz (and the binary version of the same images) and its PNG tree."""
    names = [f"c{k:03d}" for k in range(100)]
    train, test = _cifar_images(200, 100, 1), _cifar_images(50, 100, 2)
    files, binary, tree = {}, {}, base / "tree"
    for split, (ims, labels, fnames) in (("train", train), ("test", test)):
        coarse = [v // 5 for v in labels]
        files[f"cifar-100-python/{split}"] = pickle.dumps(
            {b"filenames": [n.encode() for n in fnames], b"batch_label": split.encode(), b"fine_labels": labels,
             b"coarse_labels": coarse, b"data": _rows(ims)}, protocol=2)
        binary[f"cifar-100-binary/{split}.bin"] = np.concatenate(
            [np.array(coarse, np.uint8)[:, None], np.array(labels, np.uint8)[:, None], _rows(ims)], axis=1).tobytes()
        _png_tree(tree, split, ims, labels, fnames, names)
    files["cifar-100-python/meta"] = pickle.dumps(
        {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"sc%02d" % k for k in range(20)]},
        protocol=2)
    binary["cifar-100-binary/fine_label_names.txt"] = "\n".join(names).encode()
    binary["cifar-100-binary/coarse_label_names.txt"] = "\n".join(f"sc{k:02d}" for k in range(20)).encode()
    _write_tgz(base / "cifar-100-python.tar.gz", files)
    _write_tgz(base / "cifar-100-binary.tar.gz", binary)
    return base / "cifar-100-python.tar.gz", base / "cifar-100-binary.tar.gz", tree, names


@pytest.mark.parametrize("binary", [False, True], ids=["python", "binary"])
def test_cifar10_prepares_as_its_png_tree(tmp_path, binary):
    tgz, tree, _ = _cifar10(tmp_path, binary)
    a = prepare(tgz, tmp_path / "a", PrepareConfig(**CFG))
    b = prepare(tree, tmp_path / "b", PrepareConfig(**CFG))
    assert_same_data(tmp_path / "a", tmp_path / "b")
    assert list(a["splits"]) == ["train", "test"] and a["splits"]["train"]["written"] == 60
    assert a["splits"]["test"]["written"] == 10 and a["rejected"] == 0
    assert a["class_names_from"] == ("batches.meta.txt" if binary else "batches.meta") + f" in {tgz.name}"
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["classes"] == CIFAR10_NAMES
    first = next(_jsons(tmp_path / "a", "test"))
    path = json.loads(first["json"])["path"]
    if binary:
        assert path.startswith(f"{tgz.name}/cifar-10-batches-bin/test_batch.bin/") and path[-5:].isdigit()
    else:
        assert path.startswith(f"{tgz.name}/cifar-10-batches-py/test_batch/") and path.endswith(".png")
    assert b["found"] == a["found"]


def test_cifar100_python_and_binary_prepare_as_their_png_tree(tmp_path):
    py, binary, tree, names = _cifar100(tmp_path)
    prepare(py, tmp_path / "a", PrepareConfig(**CFG))
    prepare(tree, tmp_path / "b", PrepareConfig(**CFG))
    assert_same_data(tmp_path / "a", tmp_path / "b")
    s_py, s_bin = scan(py), scan(binary)
    assert s_py.classes == s_bin.classes == names and s_py.names_from == "meta in cifar-100-python.tar.gz"
    for split in ("train", "test"):  # the same images with the same fine labels (file names differ)
        assert sorted((i.label, i.where) for i in s_py.splits[split]) == \
               sorted((i.label, i.where) for i in s_bin.splits[split])


def test_cifar_extracted_folders_read_as_the_archive(tmp_path):
    tgz, _, files = _cifar10(tmp_path, binary=False)
    holder = tmp_path / "holder"
    for name, data in files.items():
        (holder / name).parent.mkdir(parents=True, exist_ok=True)
        (holder / name).write_bytes(data)
    from_tgz, from_holder, from_folder = scan(tgz), scan(holder), scan(holder / "cifar-10-batches-py")
    strip = len(tgz.name) + 1
    for split in ("train", "test"):
        want = [(i.relpath[strip:], i.label, i.where) for i in from_tgz.splits[split]]
        assert [(i.relpath, i.label, i.where) for i in from_holder.splits[split]] == want
        assert [("cifar-10-batches-py/" + i.relpath, i.label, i.where) for i in from_folder.splits[split]] == want
    assert from_holder.names_from == "batches.meta in cifar-10-batches-py"
    reader = A.ItemReader(from_tgz.root)
    im = reader.read(from_tgz.splits["train"][0])
    assert im.mode == "RGB" and im.size == (32, 32)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps({b"data": _Payload(marker), b"labels": [], b"filenames": []}, protocol=2)
    meta = pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_NAMES]}, protocol=2)
    files = {f"cifar-10-batches-py/data_batch_{k}": evil for k in range(1, 6)}
    files.update({"cifar-10-batches-py/test_batch": evil, "cifar-10-batches-py/batches.meta": meta})
    _write_tgz(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1: not a CIFAR batch \(pickle asks for "
                                        r"(posix|os|nt)\.system\)"):
        scan(tmp_path / "cifar-10-python.tar.gz")
    assert not marker.exists()
    assert pickle.loads(evil) and marker.exists()  # what plain pickle would have done
    with pytest.raises(DataError, match=r"x: not a CIFAR batch \(pickle asks for builtins\.eval\)"):
        A.load_cifar_pickle(b"cbuiltins\neval\n(S'1+1'\ntR.", "x")
    with pytest.raises(DataError, match=r"x: not a CIFAR batch \(pickle asks for _codecs\.encode\)"):
        A.load_cifar_pickle(pickle.dumps(b"abc", protocol=2).replace(b"latin1", b"utf_16"), "x")


def test_a_cifar_batch_of_the_wrong_shape_is_refused(tmp_path):
    _, _, files = _cifar10(tmp_path, binary=False)
    files["cifar-10-batches-py/data_batch_2"] = pickle.dumps(
        {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2], b"filenames": [b"a", b"b", b"c"]}, protocol=2)
    (tmp_path / "x").mkdir()
    _write_tgz(tmp_path / "x" / "cifar-10-python.tar.gz", files)
    with pytest.raises(DataError, match=r"data_batch_2: not a CIFAR batch \(no uint8 data of N x 3072 pixels\)"):
        scan(tmp_path / "x")


def test_cli_prepares_a_cifar_tgz(tmp_path):
    tgz, _, _ = _cifar10(tmp_path, binary=False)
    r = run_here("prepare", tgz, "--size", 32, "--out", tmp_path / "out", "--workers", 1, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["class_names_from"] == "batches.meta in cifar-10-python.tar.gz"
    assert summary["splits"]["test"]["written"] == 10


# ---------------------------------------------------------------- what is not read, or damaged

def test_damaged_and_unknown_archives(tmp_path):
    tgz, _, _ = _cifar10(tmp_path, binary=False)
    data = tgz.read_bytes()
    cut = tmp_path / "cut" / tgz.name
    cut.parent.mkdir()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: damaged archive: .*download it again"):
        scan(cut)
    cut.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: damaged archive: not a gzip file$"):
        scan(cut)
    (tmp_path / "x.tar").write_bytes(b"\1" * 2048)
    with pytest.raises(DataError, match=r"x.tar: damaged archive: not a tar archive$"):
        scan(tmp_path / "x.tar")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="not a directory, nor an archive alexcli reads"):
        scan(tmp_path / "notes.txt")
    (tmp_path / "other.tar").write_bytes(tar_of([("readme.txt", b"hi")]))
    with pytest.raises(UsageError, match="not a directory, nor an archive alexcli reads"):
        scan(tmp_path / "other.tar")
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(tgz, both / tgz.name)
    (both / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"holds several data sets alexcli reads \(CIFAR-10, CIFAR-100\)"):
        scan(both)


def _jpeg(colour) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(b, "JPEG")
    return b.getvalue()


def test_an_archive_resumes_and_two_workers_write_the_same_bytes(ilsvrc, tmp_path, monkeypatch):
    """Resume and the worker pool work on archive members as on files: Ctrl-C in the middle, then
    the same command, and a run with 2 workers, both end with the uninterrupted run's data set."""
    from alexcli.errors import Interrupted

    _, arch, _, out_arch, _ = ilsvrc
    out = tmp_path / "out"
    real, calls = A.ItemReader.read, [0]

    def read_then_stop(self, item):
        calls[0] += 1
        if calls[0] == 40:  # past the first shards (16 samples each)
            raise KeyboardInterrupt
        return real(self, item)

    monkeypatch.setattr(A.ItemReader, "read", read_then_stop)
    with pytest.raises(Interrupted, match=r"shards are complete in .*; run the same command again"):
        prepare(arch, out, PrepareConfig(**CFG))
    monkeypatch.setattr(A.ItemReader, "read", real)
    again = prepare(arch, out, PrepareConfig(**CFG))
    assert again["status"] == "resumed"
    assert_same_data(out_arch, out)
    two = tmp_path / "two"
    prepare(arch, two, PrepareConfig(**{**CFG, "workers": 2}))
    assert_same_data(out_arch, two)
    for name in ("stats.safetensors", "rejected.json"):
        assert (two / name).read_bytes() == (out_arch / name).read_bytes(), name

    def manifest(out):  # the summary names its own folder
        m = json.loads((out / "dataset.json").read_text())
        return {**m, "summary": {k: v for k, v in m["summary"].items() if k not in ("out", "rejected_file")}}

    assert manifest(two) == manifest(out_arch) == manifest(out)
