"""Checkpoints: weights and everything eval needs in one safetensors file; trainer state beside it.

ckpt-eNNN.safetensors   tensors  model.<layer>.<param>  (always the one-device layout)
                                 data.mean_image, data.pca_eigval, data.pca_eigvec
                        metadata "alexcli": JSON with the architecture, the variants used (name,
                                 package, version), classes, epoch, metrics, init, alexcli version,
                                 and the checksums safetensors lacks (format version 2):
                                 tensors_sha256  `digest` of the tensors (names, dtypes, shapes, bytes)
                                 sha256          of the canonical JSON of this metadata without the
                                                 sha256 field itself (`meta_digest`), so it covers
                                                 the tensors through tensors_sha256, and every field
                        (version 1 files, whose sha256 is the tensors' digest alone, still load: their
                        metadata is checked field by field, as every file's is)
state-eNNN.safetensors  momentum buffers (velocity.<param>)
state-eNNN.json         step, schedule, seeds, data position, the run's settings; written last,
                        so its presence marks a complete epoch for --resume
best.safetensors        the checkpoint of the epoch with the lowest val top-1 error so far: a hard
                        link to (another name of) its ckpt-eNNN.safetensors, or a copy where the file
                        system has no hard links; set after each epoch's state (`mark_best`).
                        `checkpoint_in` takes it when a command is given the run folder.

Every file is written through `alexcli.io` (NAME.tmp, fsync, rename): a kill leaves either the old
file or the new one, never half of one under the final name. Nothing here unpickles anything.
Train, experiment, eval and the figures all read and write checkpoints through this module. torch
is imported only where tensors are handled, so reading a checkpoint's metadata (`alexcli runs`)
does not load it.

Reading checks, each failure a one-line DataError naming the file: a safetensors file with alexcli
metadata (read_meta reads the header only, never a pickle); the metadata's own sha256 (version 2;
no tensors needed); its fields (`check_meta`: arch, classes, class_names, variants, data, ...);
then, in load_checkpoint, the tensors against tensors_sha256; in load_model, that the weights fit
the architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from alexcli import __version__
from alexcli.errors import AlexcliError, DataError
from alexcli.io import link_or_copy, write_json, write_safetensors

if TYPE_CHECKING:
    import torch

FORMAT = "alexcli-checkpoint"
FORMAT_VERSION = 2        # 2: the sha256 covers the metadata too; 1: the tensors only
CKPT_RE = re.compile(r"^ckpt-e(\d{3,})\.safetensors$")
# the run folder's other files (train.loop writes them each epoch, `alexcli runs` reads them)
METRICS = "metrics.jsonl"
CURVES = "curves.png"
DIVERGED = "diverged.json"  # written when the loss became NaN or infinite; removed by the next complete epoch
# the epoch with the lowest val top-1 error so far (as timm's model_best): another name (a hard link)
# of its ckpt-eNNN.safetensors, a copy where the file system has no hard links; not written without val
BEST = "best.safetensors"


def ckpt_name(epoch: int) -> str:
    return f"ckpt-e{epoch:03d}.safetensors"


def state_names(epoch: int) -> tuple[str, str]:
    return f"state-e{epoch:03d}.safetensors", f"state-e{epoch:03d}.json"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in name order (catches a flipped bit)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stats_tensors(stats: dict) -> dict[str, torch.Tensor]:
    """The data set's mean image and PCA as a checkpoint stores them (its `data.*` tensors)."""
    return {k: stats[k].float() for k in ("mean_image", "pca_eigval", "pca_eigvec")}


def training_meta(*, arch, variants: dict, augment: dict, split, manifest: dict, parameters: int,
                  train_images: int | None = None, **extra) -> dict:
    """The metadata every checkpoint carries, from what built and fed the network: ARCH, the
    provenance of its VARIANTS and of each AUGMENT step (name -> provenance, in order), and the
    training SPLIT with its MANIFEST (TRAIN_IMAGES when only part of it was used). EXTRA adds the
    producer's own fields (epoch, metrics, config, ...)."""
    from alexcli.data.dataset import class_names

    folder = split.folder  # a DataLocation: a local folder's resolved path, a URL as given
    data = {"folder": folder.recorded() if hasattr(folder, "recorded") else str(Path(folder).resolve()),
            "size": split.size,
            "train_images": split.samples if train_images is None else train_images}
    return {"arch": arch.to_dict(), "variants": {**variants, **{f"augment:{k}": v for k, v in augment.items()}},
            "augment": list(augment), "classes": list(split.classes), "class_names": class_names(manifest),
            "data": data, "parameters": parameters, "init": arch.init, **extra}


def meta_digest(meta: dict) -> str:
    """sha256 of META's canonical JSON (keys sorted, no spaces) without its `sha256` field."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """META as save_checkpoint stores it beside TENSORS: format, version and alexcli version set, the
    tensors' digest and then the digest of the whole metadata added. (Tests use it to write a
    consistent file with edited metadata.)"""
    meta = json.loads(json.dumps(meta))  # as it will read back: tuples as lists, keys as strings
    meta.pop("sha256", None)
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, alexcli_version=__version__,
                tensors_sha256=digest(tensors))
    meta["sha256"] = meta_digest(meta)
    return meta


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], data: dict[str, torch.Tensor],
                    meta: dict) -> None:
    tensors = {f"model.{k}": v for k, v in state_dict.items()}
    tensors.update({f"data.{k}": v for k, v in data.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_safetensors(path, tensors, {"alexcli": json.dumps(sealed(meta, tensors))})


class Checkpoint:
    """A loaded checkpoint: .meta (dict), .model_state, .data (mean image, PCA), .arch (the Arch its
    metadata gives, fields an older writer left out at their defaults)."""

    def __init__(self, path: Path, meta: dict, tensors: dict[str, torch.Tensor]):
        self.path, self.meta = path, meta
        self.model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.data = {k[5:]: v for k, v in tensors.items() if k.startswith("data.")}

    @property
    def arch(self):
        from alexcli.model.arch import Arch

        return Arch.from_dict(self.meta["arch"])


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _check_arch(d, path):
    from alexcli.model.arch import Arch, arch_fields

    if "arch" not in d:
        raise DataError(f"{path}: metadata field 'arch' is missing")
    arch = d["arch"]
    if not isinstance(arch, dict):
        raise DataError(f"{path}: metadata field 'arch' must be an object, not a {_type_name(arch)}")
    defaults = Arch()
    for name in sorted(arch_fields() & set(arch)):
        v, kind = arch[name], type(getattr(defaults, name))
        ok = {bool: isinstance(v, bool), int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool), str: isinstance(v, str)}[kind]
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
            raise DataError(f"{path}: metadata field 'arch.{name}' must be {what}, not {v!r}")
    try:
        a = Arch.from_dict(arch)
        a.validate()
    except Exception as exc:  # noqa: BLE001 - whatever the fields make of it, one line
        raise DataError(f"{path}: metadata field 'arch' is invalid ({exc})") from None
    if a.crop < 1:
        raise DataError(f"{path}: metadata field 'arch' is invalid (crop must be positive, not {a.crop})")
    return a


def check_meta(meta: dict, path) -> None:
    """Raise a DataError naming PATH and the field when a checkpoint's metadata cannot be what
    alexcli wrote: what eval, predict, ensemble and the figures read from it, each of the right
    type and consistent with the others."""
    arch = _check_arch(meta, path)
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: metadata field 'classes' must be a list of strings"
                        + ("" if "classes" in meta else " (it is missing)"))
    if len(classes) != arch.num_classes:
        raise DataError(f"{path}: metadata field 'classes' lists {len(classes)} classes, but arch.num_classes is "
                        f"{arch.num_classes}")
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise DataError(f"{path}: metadata field 'class_names' must be a list of strings")
        if len(names) != len(classes):
            raise DataError(f"{path}: metadata field 'class_names' lists {len(names)} names, but 'classes' lists "
                            f"{len(classes)}")
    variants = meta.get("variants", {})
    if not isinstance(variants, dict):
        raise DataError(f"{path}: metadata field 'variants' must be an object, not a {_type_name(variants)}")
    for key, v in variants.items():
        if not (isinstance(v, dict) and all(isinstance(v.get(f), str) for f in ("name", "package", "version"))):
            raise DataError(f"{path}: metadata field 'variants.{key}' must be an object with name, package and "
                            f"version")
    augment = meta.get("augment", [])
    if not isinstance(augment, list) or not all(isinstance(a, str) for a in augment):
        raise DataError(f"{path}: metadata field 'augment' must be a list of strings")
    data = meta.get("data", {})
    if not isinstance(data, dict):
        raise DataError(f"{path}: metadata field 'data' must be an object, not a {_type_name(data)}")
    if data.get("folder") is not None and not isinstance(data["folder"], str):
        raise DataError(f"{path}: metadata field 'data.folder' must be a string")
    size = data.get("size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= arch.crop):
        raise DataError(f"{path}: metadata field 'data.size' must be an integer of at least arch.crop "
                        f"({arch.crop}), not {size!r}")
    epoch = meta.get("epoch")
    if epoch is not None and not (isinstance(epoch, int) and not isinstance(epoch, bool)):
        raise DataError(f"{path}: metadata field 'epoch' must be an integer, not {epoch!r}")


def read_meta(path: str | os.PathLike, *, check: bool = True) -> dict:
    """The checkpoint's metadata, without reading its tensors: the metadata's own sha256 (format
    version 2) and, with CHECK, its fields (`check_meta`) verified."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise DataError(f"{path}: a folder, not a checkpoint")
        if path.exists():
            from alexcli.data.scan import file_kind

            raise DataError(f"{path}: not a regular file ({file_kind(path.stat().st_mode)}), not a checkpoint")
        raise DataError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="numpy") as f:  # the header alone: no torch needed
            raw = (f.metadata() or {}).get("alexcli")
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise DataError(f"{path}: not a safetensors file ({_one_line(exc)})") from None
    if raw is None:
        raise DataError(f"{path}: a safetensors file, but not an alexcli checkpoint (no 'alexcli' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise DataError(f"{path}: damaged alexcli metadata (not JSON)") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: damaged alexcli metadata (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not an alexcli checkpoint (format {meta.get('format')!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DataError(f"{path}: metadata field 'format_version' must be an integer, not {version!r}")
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: written by a newer alexcli ({meta.get('alexcli_version')}); upgrade alexcli")
    if not isinstance(meta.get("sha256"), str):
        raise DataError(f"{path}: metadata field 'sha256' is missing (damaged file)")
    if version >= 2:
        if meta_digest(meta) != meta["sha256"]:
            raise DataError(f"{path}: metadata does not match the sha256 stored in it (edited or corrupt file)")
    elif "tensors_sha256" in meta:  # version 2's field: edited metadata marked as the older format
        raise DataError(f"{path}: metadata of format version 2 marked as version 1 (edited file)")
    if check:
        check_meta(meta, path)
    return meta


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """The checkpoint's metadata (read_meta's checks) and tensors; with VERIFY (the default) the
    tensors checked against their stored digest."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise DataError(f"{path}: unreadable tensors ({_one_line(exc)})") from None
    stored = meta["tensors_sha256"] if meta.get("format_version", 0) >= 2 else meta["sha256"]
    if verify and digest(tensors) != stored:
        raise DataError(f"{path}: tensors do not match the sha256 stored in it (corrupt file)")
    return Checkpoint(path, meta, tensors)


def checkpoint_epochs(run: Path) -> list[int]:
    """The epochs of RUN's ckpt-eNNN.safetensors files, ascending."""
    return sorted(int(m.group(1)) for p in run.glob("ckpt-e*.safetensors") if (m := CKPT_RE.match(p.name)))


def latest_complete_epoch(run: Path) -> int | None:
    """The last epoch whose checkpoint and trainer state were all written."""
    for e in reversed(checkpoint_epochs(run)):
        if all((run / n).is_file() for n in state_names(e)):
            return e
    return None


def mark_best(run: Path, epoch: int | None) -> None:
    """Make run/BEST the checkpoint of EPOCH (the run's best so far; None: no val, nothing written).
    Called after each epoch's trainer state, so a run killed between the two finds it pointing at
    the previous best and sets it at its next epoch: BEST is always a committed epoch's checkpoint."""
    if epoch is None:
        return
    src, dst = run / ckpt_name(epoch), run / BEST
    try:
        if os.path.samefile(src, dst) or read_meta(dst, check=False)["sha256"] == read_meta(src, check=False)["sha256"]:
            return  # already it (the link, or a copy of the same file)
    except (OSError, DataError):
        pass  # not there yet, or not a checkpoint: (re)made below
    link_or_copy(src, dst)


def checkpoint_in(path: str | os.PathLike, last: bool = False) -> Path:
    """The checkpoint a command given PATH reads: PATH itself when it is not a folder (read_meta
    says what is wrong with it); in a run folder of alexcli train its best.safetensors, or with
    LAST (or without one: no val split) its latest complete epoch's checkpoint. A folder of runs
    (alexcli experiment's) or a folder without checkpoints is a DataError naming what to give."""
    from alexcli.errors import UsageError

    path = Path(path)
    if not path.is_dir():
        if last and path.exists():
            raise UsageError(f"--last: {path} is a checkpoint; --last picks the latest checkpoint of a run folder")
        return path
    if not last and (path / BEST).is_file():
        return path / BEST
    epoch = latest_complete_epoch(path)
    if epoch is None:  # a run stopped before its first complete epoch, or written by hand: the newest
        epoch = max(checkpoint_epochs(path), default=None)
    if epoch is not None:
        return path / ckpt_name(epoch)
    runs = sorted(p.name for p in path.iterdir() if p.is_dir() and (any(p.glob("ckpt-e*.safetensors"))
                                                                    or (p / BEST).is_file()))
    if runs:
        shown = ", ".join(runs[:4]) + (", ..." if len(runs) > 4 else "")
        raise DataError(f"{path}: a folder of runs ({shown}), not a run: give one of them, e.g. {path / runs[0]}")
    raise DataError(f"{path}: a folder without checkpoints (ckpt-eNNN.safetensors); give a checkpoint or the run "
                    f"folder of alexcli train")


def seal_state(state: dict) -> dict:
    """A trainer state (an epoch's, or a snapshot's marker) with the sha256 of its canonical JSON,
    as a checkpoint's metadata carries its own: an edited state is refused on --resume."""
    state = {k: v for k, v in state.items() if k != "sha256"}
    return dict(state, sha256=meta_digest(state))


def check_state(state, where) -> dict:
    """STATE as --resume may use it, or a DataError naming WHERE: its sha256 (states written before
    it existed have none), the fields the run reads, and its saved settings valid as options."""
    from alexcli.train.config import TrainConfig

    if not isinstance(state, dict):
        raise DataError(f"{where}: not a trainer state (not a JSON object)")
    if "sha256" in state and state["sha256"] != meta_digest(state):
        raise DataError(f"{where}: does not match the sha256 stored in it (edited or corrupt file)")
    for field, kind in (("config", dict), ("schedule", dict), ("metrics", list), ("best", dict)):
        if field in state and not isinstance(state[field], kind):
            raise DataError(f"{where}: field {field!r} must be a {'list' if kind is list else 'object'}")
    if not isinstance(state.get("config"), dict) or not state["config"]:
        raise DataError(f"{where}: holds no run settings ('config')")
    try:
        TrainConfig.from_dict(state["config"]).validate()
    except (AlexcliError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: its saved settings are not valid ({exc})") from None
    return state


def save_trainer_state(run: Path, epoch: int, velocity: dict[str, torch.Tensor], state: dict) -> None:
    tensors_name, json_name = state_names(epoch)
    write_safetensors(run / tensors_name, {f"velocity.{k}": v for k, v in velocity.items()},
                      {"alexcli": json.dumps({"format": "alexcli-trainer-state", "epoch": epoch})})
    write_json(run / json_name, seal_state(dict(state, epoch=epoch, alexcli_version=__version__)))


def load_trainer_state(run: Path, epoch: int) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors_name, json_name = state_names(epoch)
    try:
        velocity = {k[9:]: v for k, v in load_file(str(run / tensors_name)).items() if k.startswith("velocity.")}
        state = json.loads((run / json_name).read_text(encoding="utf-8"))
    except Exception as exc:
        raise DataError(f"{run}: trainer state of epoch {epoch} unreadable ({type(exc).__name__}: {exc})") from None
    return velocity, check_state(state, run / json_name)


def prune(run: Path, keep: int, best_epoch: int | None, latest: int) -> list[str]:
    """Keep the last KEEP checkpoints plus the best; trainer state only for the latest. Returns the
    names removed."""
    removed = []
    epochs = checkpoint_epochs(run)
    keep_set = set(epochs[-keep:]) if keep > 0 else set()
    keep_set |= {latest} | ({best_epoch} if best_epoch else set())
    for e in epochs:
        names = [] if e in keep_set else [ckpt_name(e)]
        if e != latest:
            names += list(state_names(e))
        for n in names:
            if (run / n).exists():
                (run / n).unlink()
                removed.append(n)
    return removed


def check_variants(meta: dict, path) -> None:
    """Every layer variant and augmentation the checkpoint used must be installed: a missing one
    is an error that names the package to install."""
    from alexcli import plugins
    from alexcli.errors import PluginError

    for key, v in meta.get("variants", {}).items():
        kind = "augmentation" if key.startswith("augment:") else key
        try:
            plugins.info(kind, v["name"])
        except plugins.PluginConflictError:
            raise  # installed twice, not missing: its own message names both packages
        except PluginError:
            raise PluginError(f"{path} was trained with {kind} {v['name']!r} from package {v['package']} "
                              f"{v['version']}, which is not installed: pip install {v['package']}") from None


def load_model(path: str | os.PathLike, device="cpu"):
    """The network of a checkpoint, rebuilt from its metadata alone, in eval mode; and the checkpoint."""
    from alexcli.errors import PluginError, UsageError
    from alexcli.model.registry import build_model

    ckpt = load_checkpoint(path)
    check_variants(ckpt.meta, ckpt.path)
    try:
        model, _ = build_model(ckpt.arch)
    except PluginError:  # a missing architecture package: the message names what to install
        raise
    except UsageError as exc:  # sizes the network refuses (a crop too small), an unknown init
        raise DataError(f"{ckpt.path}: the architecture in its metadata cannot be built ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - sizes a layer refuses, found by torch
        raise DataError(f"{ckpt.path}: the architecture in its metadata cannot be built ({_one_line(exc)})") from None
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as exc:
        raise DataError(f"{ckpt.path}: weights do not fit the architecture in its metadata ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """`alexcli verify CHECKPOINT`: every check loading does (metadata sha256 and fields, tensors'
    digest, installed variants, weights fitting the architecture) and the data tensors' shapes.
    Returns {"path", "kind", "ok", "problems", ...}; problems are one line each, naming the file."""
    from alexcli.errors import AlexcliError

    path = Path(path)
    result = {"path": str(path), "kind": "checkpoint", "ok": False, "problems": []}
    try:
        model, ckpt = load_model(path)
    except AlexcliError as exc:
        result["problems"].append(str(exc))
        return result
    meta = ckpt.meta
    size, crop = meta.get("data", {}).get("size"), ckpt.arch.crop
    expected = {"mean_image": (3, size, size) if size else None, "pca_eigval": (3,), "pca_eigvec": (3, 3)}
    for name, shape in expected.items():
        t = ckpt.data.get(name)
        if t is None:
            result["problems"].append(f"{path}: tensor data.{name} is missing")
        elif shape is not None and tuple(t.shape) != shape:
            result["problems"].append(f"{path}: tensor data.{name} has shape {tuple(t.shape)}, expected {shape}")
        elif name == "mean_image" and size is None and (t.dim() != 3 or t.shape[0] != 3 or min(t.shape[1:]) < crop):
            result["problems"].append(f"{path}: tensor data.mean_image has shape {tuple(t.shape)}, expected "
                                      f"(3, S, S) with S >= {crop}")
    result.update(ok=not result["problems"], format_version=meta.get("format_version", 0), sha256=meta["sha256"],
                  epoch=meta.get("epoch"), arch=ckpt.arch.name,
                  classes=len(meta["classes"]), tensors=len(ckpt.model_state) + len(ckpt.data),
                  parameters=sum(t.numel() for t in ckpt.model_state.values()))
    return result
