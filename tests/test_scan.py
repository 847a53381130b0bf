import io

import numpy as np
import pytest
from PIL import Image

from alexcli.data.scan import scan
from alexcli.errors import DataError, UsageError


def jpeg(path, colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    b = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(b, "JPEG")
    path.write_bytes(b.getvalue())


@pytest.fixture
def tree(tmp_path):
    for c in ("n02", "n01"):
        for i in range(3):
            jpeg(tmp_path / "train" / c / f"{c}_{i}.JPEG")
    return tmp_path


def test_train_classes_sorted_and_labelled(tree):
    src = scan(tree)
    assert src.classes == ["n01", "n02"]
    assert src.class_names == ["n01", "n02"]
    assert [(it.relpath, it.label) for it in src.splits["train"]][:2] == [("train/n01/n01_0.JPEG", 0),
                                                                         ("train/n01/n01_1.JPEG", 0)]
    assert src.found("train") == 6 and src.rejected == []


def test_val_and_test_class_folders(tree):
    jpeg(tree / "val" / "n02" / "a.JPEG")
    jpeg(tree / "test" / "n01" / "b.JPEG")
    src = scan(tree)
    assert [(i.relpath, i.label) for i in src.splits["val"]] == [("val/n02/a.JPEG", 1)]
    assert [(i.relpath, i.label) for i in src.splits["test"]] == [("test/n01/b.JPEG", 0)]
    assert src.rejected == []


def test_a_val_class_that_train_does_not_have_is_an_error(tree):
    """It was a reject per image and exit 0: a val/ of other classes (another data set's) gave a
    data set whose val split was empty or partial without a word."""
    from alexcli.errors import DataError

    jpeg(tree / "val" / "n02" / "a.JPEG")
    jpeg(tree / "val" / "n99" / "c.JPEG")
    jpeg(tree / "val" / "cat" / "d.JPEG")
    with pytest.raises(DataError) as e:
        scan(tree)
    assert str(e.value) == (f"{tree}: val/ has class folder(s) that train/ does not have: 'cat', 'n99'; a val "
                            "split's folders must be training classes (rename or remove them)")


def test_flat_val_with_loc_solution(tree):
    jpeg(tree / "val" / "ILSVRC2012_val_00000001.JPEG")
    jpeg(tree / "val" / "ILSVRC2012_val_00000002.JPEG")
    jpeg(tree / "val" / "ILSVRC2012_val_00000003.JPEG")
    (tree / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n02 1 2 3 4 n02 5 6 7 8\n"
        "ILSVRC2012_val_00000002,n01 1 2 3 4\n")
    src = scan(tree)
    assert [(i.relpath, i.label) for i in src.splits["val"]] == [
        ("val/ILSVRC2012_val_00000001.JPEG", 1), ("val/ILSVRC2012_val_00000002.JPEG", 0)]
    assert src.rejected == [{"path": "val/ILSVRC2012_val_00000003.JPEG", "split": "val",
                             "reason": "no label in the ground truth"}]


def test_flat_val_with_devkit_ground_truth(tree):
    scipy_io = pytest.importorskip("scipy.io")  # scipy is in the dev extras, so this runs in CI
    for k in (1, 2):
        jpeg(tree / "val" / f"ILSVRC2012_val_0000000{k}.JPEG")
    devkit = tree / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # The devkit numbers classes in its own order, not sorted by wnid.
    synsets = np.array([(1, "n02"), (2, "n01")], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    src = scan(tree)
    assert [(i.relpath, i.label) for i in src.splits["val"]] == [
        ("val/ILSVRC2012_val_00000001.JPEG", 0), ("val/ILSVRC2012_val_00000002.JPEG", 1)]


def test_flat_val_without_labels_is_skipped_and_said(tree):
    jpeg(tree / "val" / "x.JPEG")
    src = scan(tree)
    assert "val" not in src.splits
    assert src.notes and "val/ skipped: 1 files in a flat folder with no labels" in src.notes[0]


def test_class_names_from_synset_mapping_or_words(tree):
    (tree / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tkit fox\n")
    assert scan(tree).class_names == ["goldfish, Carassius auratus", "kit fox"]
    (tree / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 great white shark\n")
    assert scan(tree).class_names == ["tench, Tinca tinca", "great white shark"]


def test_loose_file_in_train_is_rejected(tree):
    (tree / "train" / "notes.txt").write_text("x")
    assert scan(tree).rejected == [{"path": "train/notes.txt", "split": "train", "reason": "not in a class folder"}]


def test_bad_sources(tmp_path):
    with pytest.raises(UsageError, match="missing: no such file or directory"):
        scan(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(UsageError, match="notes.txt: not a directory, nor an archive alexcli reads"):
        scan(tmp_path / "notes.txt")
    (tmp_path / "notes.txt").unlink()
    with pytest.raises(DataError, match="no training split"):
        scan(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan(tmp_path)
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(DataError, match="no files in its class folders"):
        scan(tmp_path)


def test_nested_folders_keep_os_walk_order(tree):
    # The training order is shuffled from this list: it must stay what it was (os.walk's: each
    # folder's files by name, then its subfolders by name), or a rerun would not resume.
    for rel in ("train/n01/z/deep/1.JPEG", "train/n01/a/2.JPEG", "train/n01/zz.JPEG", "train/n01/a/b/3.JPEG"):
        jpeg(tree / rel)
    import os

    walked = []
    for dirpath, dirnames, filenames in os.walk(tree / "train" / "n01"):
        dirnames.sort()
        walked += [os.path.relpath(os.path.join(dirpath, f), tree).replace(os.sep, "/") for f in sorted(filenames)]
    got = [it.relpath for it in scan(tree).splits["train"] if it.label == 0]
    assert got == walked and len(got) == 7
    assert [it.nbytes for it in scan(tree).splits["train"]] == [(tree / it.relpath).stat().st_size
                                                                 for it in scan(tree).splits["train"]]
