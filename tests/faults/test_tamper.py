"""Files that are not what was written: edited checkpoint metadata, damaged or foreign checkpoints,
shards with other bytes. The promise: exit 2 and one line naming the file and what is wrong (never a
traceback, never a silent result), nothing unpickled, and `alexcli verify` listing every problem."""

import io
import json
import random
import shutil
import struct
import tarfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from alexcli.cli import app, main
from conftest import run_cli


def cli(*args) -> int:
    """`alexcli ARGS` in this process, through main's error handling."""
    from alexcli.cli.figures import register

    if "predict" not in {c.name for c in app.registered_commands}:
        register(app)
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def ckpt(train_data, tmp_path_factory):
    """A small checkpoint written as training writes one (its weights untrained: the file is what is
    under test)."""
    from alexcli import checkpoint as ck
    from alexcli.data.dataset import load_stats, open_split, read_manifest
    from alexcli.model.registry import build_model, count_parameters, make_arch

    torch.manual_seed(0)
    arch = make_arch("alexnet", num_classes=8, crop=64, width=0.125, init="kaiming")
    net, variants = build_model(arch)
    split = open_split(train_data, "train", verify=False)
    meta = ck.training_meta(arch=arch, variants=variants, augment={}, split=split,
                            manifest=read_manifest(train_data), parameters=count_parameters(net), epoch=1)
    path = tmp_path_factory.mktemp("tamper") / "ckpt-e001.safetensors"
    ck.save_checkpoint(path, net.state_dict(), ck.stats_tensors(load_stats(train_data)), meta)
    return path


@pytest.fixture(scope="module")
def photo(demo_src):
    return sorted((demo_src / "val" / "ring").glob("*.JPEG"))[0]


def stored_meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["alexcli"])


def rewrite(src, dst, edit, *, reseal=False, raw=None):
    """DST: SRC's tensors with its metadata edited by EDIT (in place), resealed (a consistent file, as
    a careful forger or a buggy writer would make) or not; RAW: that exact metadata string instead."""
    from alexcli.checkpoint import sealed

    tensors = load_file(str(src))
    meta = stored_meta(src)
    edit(meta)
    if reseal:
        meta = sealed(meta, tensors)
    dst.write_bytes(save(tensors, {"alexcli": raw if raw is not None else json.dumps(meta)}))
    return dst


def as_version_1(meta):
    """What alexcli wrote before format version 2: the sha256 of the tensors only."""
    meta["format_version"] = 1
    meta["sha256"] = meta.pop("tensors_sha256")


def commands(path, train_data, photo):
    return {"eval": ["eval", path, "--data", train_data, "--no-verify"],
            "predict": ["predict", path, photo],
            "ensemble": ["ensemble", path, path, "--data", train_data, "--no-verify"],
            "verify": ["verify", path]}


def assert_one_line(capsys, code, message):
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert err.strip().splitlines()[-1] == f"error: {message}"


def test_the_checkpoint_itself_is_fine(ckpt, train_data, photo, capsys):
    assert stored_meta(ckpt)["format_version"] == 2
    for name, args in commands(ckpt, train_data, photo).items():
        assert cli(*args) == 0, (name, capsys.readouterr().err)
    capsys.readouterr()
    assert cli("verify", ckpt, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["kind"] == "checkpoint" and got["ok"] is True and got["problems"] == []
    assert got["format_version"] == 2 and got["path"] == str(ckpt)


EDITS = {
    "drop arch": lambda m: m.pop("arch"),
    "shorter classes": lambda m: m.update(classes=m["classes"][:-1]),
    "wider": lambda m: m["arch"].update(width=0.25),
    "other epoch": lambda m: m.update(epoch=90),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_metadata_no_longer_matches_its_sha256(ckpt, train_data, photo, tmp_path, capsys, edit):
    bad = rewrite(ckpt, tmp_path / "ckpt-e001.safetensors", EDITS[edit])
    for args in commands(bad, train_data, photo).values():
        assert_one_line(capsys, cli(*args),
                        f"{bad}: metadata does not match the sha256 stored in it (edited or corrupt file)")


# resealed: the file is consistent, so what is checked is the metadata itself
RESEALED = {
    "drop arch": (lambda m: m.pop("arch"), "metadata field 'arch' is missing"),
    "arch a list": (lambda m: m.update(arch=[1, 2]), "metadata field 'arch' must be an object, not a list"),
    "width a word": (lambda m: m["arch"].update(width="wide"), "metadata field 'arch.width' must be a number, "
                                                               "not 'wide'"),
    "width out of range": (lambda m: m["arch"].update(width=9),
                           "metadata field 'arch' is invalid (--width must be in (0, 4], not 9)"),
    "wider": (lambda m: m["arch"].update(width=0.25),
              "weights do not fit the architecture in its metadata (Error(s) in loading state_dict for AlexNet:)"),
    "shorter classes": (lambda m: m.update(classes=m["classes"][:-1]),
                        "metadata field 'classes' lists 7 classes, but arch.num_classes is 8"),
    "classes not strings": (lambda m: m.update(classes=list(range(8))),
                            "metadata field 'classes' must be a list of strings"),
    "shorter class names": (lambda m: m.update(class_names=m["class_names"][:3]),
                            "metadata field 'class_names' lists 3 names, but 'classes' lists 8"),
    "variant a string": (lambda m: m["variants"].update(norm="lrn"),
                         "metadata field 'variants.norm' must be an object with name, package and version"),
    "variant without package": (lambda m: m["variants"]["norm"].pop("package"),
                                "metadata field 'variants.norm' must be an object with name, package and version"),
    "data a string": (lambda m: m.update(data="/somewhere"), "metadata field 'data' must be an object, not a str"),
}


@pytest.mark.parametrize("edit", list(RESEALED))
def test_resealed_metadata_is_checked_field_by_field(ckpt, train_data, photo, tmp_path, capsys, edit):
    change, message = RESEALED[edit]
    bad = rewrite(ckpt, tmp_path / "ckpt-e001.safetensors", change, reseal=True)
    for name, args in commands(bad, train_data, photo).items():
        if edit == "data a string" and name in ("eval", "ensemble"):
            args = [a for a in args if a != "--no-verify"]
        assert_one_line(capsys, cli(*args), f"{bad}: {message}")


def test_an_arch_without_the_fields_an_older_writer_left_out(ckpt, train_data, photo, tmp_path, capsys):
    """Arch fields missing from the metadata take their defaults (Arch.from_dict), everywhere."""
    def older(m):
        for k in ("name", "input_scale", "conv6"):
            m["arch"].pop(k)

    def without_crop(m):  # AlexNet's default crop is 224, but this one was trained at 64 on 72x72 images
        m["arch"].pop("crop")

    bad = rewrite(ckpt, tmp_path / "old.safetensors", without_crop, reseal=True)
    assert_one_line(capsys, cli("eval", bad, "--data", train_data, "--no-verify"),
                    f"{bad}: metadata field 'data.size' must be an integer of at least arch.crop (224), not 72")
    old = rewrite(ckpt, tmp_path / "old64.safetensors", older, reseal=True)
    for name, args in commands(old, train_data, photo).items():
        assert cli(*args) == 0, (name, capsys.readouterr().err)


def test_version_1_checkpoints_still_load_with_their_metadata_checked(ckpt, train_data, photo, tmp_path, capsys):
    old = rewrite(ckpt, tmp_path / "v1.safetensors", as_version_1)
    for name, args in commands(old, train_data, photo).items():
        assert cli(*args) == 0, (name, capsys.readouterr().err)
    capsys.readouterr()
    assert cli("verify", old, "--json") == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1
    # version 1 does not cover its metadata, so an edit is found by what it breaks
    for edit, message in [
        (lambda m: m.pop("arch"), "metadata field 'arch' is missing"),
        (lambda m: m.update(classes=m["classes"][:-1]), "metadata field 'classes' lists 7 classes, but "
                                                        "arch.num_classes is 8"),
        (lambda m: m["arch"].update(width=0.25), "weights do not fit the architecture in its metadata "
                                                 "(Error(s) in loading state_dict for AlexNet:)"),
        (lambda m: m["arch"].update(width=0.13), "weights do not fit the architecture in its metadata "
                                                 "(Error(s) in loading state_dict for AlexNet:)"),
        (lambda m: m["arch"].update(crop=20), "the architecture in its metadata cannot be built"),
    ]:
        bad = rewrite(ckpt, tmp_path / "v1-bad.safetensors", lambda m: (as_version_1(m), edit(m)))
        for args in commands(bad, train_data, photo).values():
            code = cli(*args)
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
            assert err.strip().splitlines()[-1].startswith(f"error: {bad}: {message}"), err


def test_a_version_2_file_marked_version_1_is_refused(ckpt, train_data, photo, tmp_path, capsys):
    """Marking edited metadata as version 1 (whose sha256 covers the tensors only) does not pass."""
    def downgrade(m):
        m["format_version"] = 1
        m["sha256"] = m["tensors_sha256"]
        m["epoch"] = 90

    bad = rewrite(ckpt, tmp_path / "ckpt-e001.safetensors", downgrade)
    for args in commands(bad, train_data, photo).values():
        assert_one_line(capsys, cli(*args), f"{bad}: metadata of format version 2 marked as version 1 "
                                            f"(edited file)")


def test_flipped_tensor_bit_is_named(ckpt, train_data, photo, tmp_path, capsys):
    bad = tmp_path / "ckpt-e001.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[-100] ^= 0x01
    bad.write_bytes(bytes(raw))
    for args in commands(bad, train_data, photo).values():
        assert_one_line(capsys, cli(*args), f"{bad}: tensors do not match the sha256 stored in it (corrupt file)")


def test_metadata_that_is_not_an_object(ckpt, train_data, photo, tmp_path, capsys):
    for raw, what in [("[1, 2]", "not a JSON object"), ("{\"format\": ", "not JSON")]:
        bad = rewrite(ckpt, tmp_path / "ckpt-e001.safetensors", lambda m: None, raw=raw)
        for args in commands(bad, train_data, photo).values():
            assert_one_line(capsys, cli(*args), f"{bad}: damaged alexcli metadata ({what})")


class Payload:
    """Unpickling this creates MARKER: if it exists afterwards, something unpickled the file."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def foreign_files(tmp_path):
    marker = tmp_path / "unpickled"
    Payload.marker = marker
    files = {}
    files["random.safetensors"] = random.Random(0).randbytes(4096)
    buf = io.BytesIO()
    torch.save({"model": Payload()}, buf)  # torch's zip format
    files["torch-save.safetensors"] = buf.getvalue()
    files["pickle.safetensors"] = __import__("pickle").dumps(Payload(), protocol=2)
    files["huge-header.safetensors"] = struct.pack("<Q", 1 << 62) + b"{}"
    files["header-past-the-end.safetensors"] = struct.pack("<Q", 1 << 20) + b'{"a": 1}'
    files["empty.safetensors"] = b""
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    return paths, marker


def test_foreign_files_are_one_line_and_never_unpickled(train_data, photo, tmp_path, capsys):
    paths, marker = foreign_files(tmp_path)
    for path in paths:
        for args in commands(path, train_data, photo).values():
            code = cli(*args)
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
            assert err.startswith(f"error: {path}: not a safetensors file ("), err
    assert not marker.exists()
    r = run_cli("eval", paths[1], "--data", train_data)  # and as a user runs it
    assert r.returncode == 2 and r.stderr.startswith(f"error: {paths[1]}: not a safetensors file (")
    assert r.stderr.count("\n") == 1 and not marker.exists()


# ---------------------------------------------------------------- alexcli verify on a data folder

def test_verify_a_good_data_folder(train_data, capsys):
    assert cli("verify", train_data, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    manifest = json.loads((train_data / "dataset.json").read_text())
    assert got["kind"] == "data" and got["ok"] is True and got["problems"] == []
    assert got["shards"] == sum(len(s["shards"]) for s in manifest["splits"].values())
    assert got["samples"] == sum(e["samples"] for s in manifest["splits"].values() for e in s["shards"])
    assert cli("verify", train_data) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and f"{got['shards']} shards" in out


def test_verify_lists_every_problem_of_a_data_folder(train_data, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(train_data, data)
    manifest = json.loads((data / "dataset.json").read_text())
    # 1. bytes flipped inside a JPEG (same size)
    flipped = data / "val-000000.tar"
    with tarfile.open(flipped) as tar:
        m = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    raw = bytearray(flipped.read_bytes())
    for i in range(m.offset_data + m.size // 2, m.offset_data + m.size // 2 + 16):
        raw[i] ^= 0x55
    flipped.write_bytes(bytes(raw))
    # 2. a JPEG that no longer decodes, its sha256 put in the manifest (only decoding finds it)
    broken = data / "val-000001.tar"
    with tarfile.open(broken) as tar:
        m = [m for m in tar.getmembers() if m.name.endswith(".jpg")][0]
    key = m.name[:-4]
    raw = bytearray(broken.read_bytes())
    raw[m.offset_data:m.offset_data + m.size] = b"\0" * m.size
    broken.write_bytes(bytes(raw))
    import hashlib

    manifest["splits"]["val"]["shards"][1]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    # 3. a missing shard, 4. a sample count the shard does not have
    (data / "train-000004.tar").unlink()
    manifest["splits"]["train"]["shards"][1]["samples"] += 1
    # 5. class names that do not match the classes
    manifest["class_names"] = manifest["class_names"][:-1]
    (data / "dataset.json").write_text(json.dumps(manifest))
    # 6. damaged statistics
    (data / "stats.safetensors").write_bytes(b"\0" * 64)

    assert cli("verify", data, "--json") == 2
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    assert got["ok"] is False and got["kind"] == "data"
    problems = got["problems"]
    expected = [
        f"{data}: class_names lists 7 names, but classes lists 8",
        f"{data / 'train-000001.tar'}: 12 samples read, but dataset.json says 13 (truncated or replaced)",
        f"{data / 'train-000004.tar'}: missing (listed in dataset.json)",
        f"{flipped}: sha256 differs from dataset.json (corrupt or replaced)",
        f"{broken}: sample {key}: undecodable JPEG (not an image PIL recognises)",
    ]
    for e in expected:
        assert e in problems, (e, problems)
    assert any(p.startswith(f"{data / 'stats.safetensors'}: unreadable") for p in problems), problems
    assert len(problems) == len(expected) + 1
    assert cap.err.strip().splitlines()[-1] == f"error: {problems[0]} (and {len(problems) - 1} more problems)"
    assert cli("verify", data, "--json", "--workers", "2") == 2  # the same from worker processes
    assert json.loads(capsys.readouterr().out)["problems"] == problems
    assert cli("verify", data) == 2  # the table form: one line per problem
    out = capsys.readouterr().out
    assert all(p in out for p in problems) and f"{len(problems)} problems" in out


def test_verify_remembers_what_it_verified(train_data, tmp_path, monkeypatch, capsys):
    import time

    from alexcli.data import dataset

    data = tmp_path / "d"
    shutil.copytree(train_data, data)
    monkeypatch.setattr(dataset, "_now_ns", lambda: time.time_ns() + 10 ** 10)
    assert cli("verify", data) == 0
    hashed = []
    monkeypatch.setattr(dataset, "sha256_file", lambda p, *a, **k: hashed.append(p) or "?")
    dataset.open_split(data, "train")
    dataset.open_split(data, "val")
    assert hashed == []


def test_verify_of_what_is_neither(tmp_path, capsys):
    assert_one_line(capsys, cli("verify", tmp_path), f"{tmp_path}: neither a prepared data folder (no dataset.json) "
                                                     f"nor a checkpoint file")
    assert_one_line(capsys, cli("verify", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file or folder")


def test_verify_help_has_examples(capsys):
    assert main(["verify", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples:" in text and "alexcli verify shards/imagenet" in text and "--json" in text
