"""Checkpoints: weights and everything eval needs in one safetensors file; trainer state beside it.

ckpt-eNNN.safetensors   tensors  model.<layer>.<param>  (always the one-device layout)
                                 data.mean_image, data.pca_eigval, data.pca_eigvec
                        metadata "alexcli": JSON with the architecture, the variants used (name,
                                 package, version), classes, epoch, metrics, init, the sha256 of
                                 the tensors (safetensors has no checksum), alexcli version
state-eNNN.safetensors  momentum buffers (velocity.<param>)
state-eNNN.json         step, schedule, seeds, data position, the run's settings; written last,
                        so its presence marks a complete epoch for --resume

Every file is written through `alexcli.io` (NAME.tmp, fsync, rename): a kill leaves either the old
file or the new one, never half of one under the final name. Nothing here unpickles anything.
Train, experiment, eval and the figures all read and write checkpoints through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from alexcli import __version__
from alexcli.errors import DataError
from alexcli.io import write_json, write_safetensors

FORMAT = "alexcli-checkpoint"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^ckpt-e(\d{3,})\.safetensors$")


def ckpt_name(epoch: int) -> str:
    return f"ckpt-e{epoch:03d}.safetensors"


def state_names(epoch: int) -> tuple[str, str]:
    return f"state-e{epoch:03d}.safetensors", f"state-e{epoch:03d}.json"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in name order (catches a flipped bit)."""
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

    data = {"folder": str(Path(split.folder).resolve()), "size": split.size,
            "train_images": split.samples if train_images is None else train_images}
    return {"arch": arch.to_dict(), "variants": {**variants, **{f"augment:{k}": v for k, v in augment.items()}},
            "augment": list(augment), "classes": list(split.classes), "class_names": class_names(manifest),
            "data": data, "parameters": parameters, "init": arch.init, **extra}


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], data: dict[str, torch.Tensor],
                    meta: dict) -> None:
    tensors = {f"model.{k}": v for k, v in state_dict.items()}
    tensors.update({f"data.{k}": v for k, v in data.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, alexcli_version=__version__,
                sha256=digest(tensors))
    write_safetensors(path, tensors, {"alexcli": json.dumps(meta)})


class Checkpoint:
    """A loaded checkpoint: .meta (dict), .model_state, .data (mean image, PCA)."""

    def __init__(self, path: Path, meta: dict, tensors: dict[str, torch.Tensor]):
        self.path, self.meta = path, meta
        self.model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.data = {k[5:]: v for k, v in tensors.items() if k.startswith("data.")}


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("alexcli")
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise DataError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from None
    if raw is None:
        raise DataError(f"{path}: a safetensors file, but not an alexcli checkpoint (no 'alexcli' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise DataError(f"{path}: damaged alexcli metadata") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not an alexcli checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: written by a newer alexcli ({meta.get('alexcli_version')}); upgrade alexcli")
    return meta


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise DataError(f"{path}: unreadable tensors ({type(exc).__name__}: {exc})") from None
    if verify and digest(tensors) != meta.get("sha256"):
        raise DataError(f"{path}: tensors do not match the sha256 stored in it (corrupt file)")
    return Checkpoint(path, meta, tensors)


def latest_complete_epoch(run: Path) -> int | None:
    """The last epoch whose checkpoint and trainer state were all written."""
    epochs = sorted((int(m.group(1)) for p in run.glob("ckpt-e*.safetensors") if (m := CKPT_RE.match(p.name))),
                    reverse=True)
    for e in epochs:
        if all((run / n).is_file() for n in state_names(e)):
            return e
    return None


def save_trainer_state(run: Path, epoch: int, velocity: dict[str, torch.Tensor], state: dict) -> None:
    tensors_name, json_name = state_names(epoch)
    write_safetensors(run / tensors_name, {f"velocity.{k}": v for k, v in velocity.items()},
                      {"alexcli": json.dumps({"format": "alexcli-trainer-state", "epoch": epoch})})
    write_json(run / json_name, dict(state, epoch=epoch, alexcli_version=__version__))


def load_trainer_state(run: Path, epoch: int) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors_name, json_name = state_names(epoch)
    try:
        velocity = {k[9:]: v for k, v in load_file(str(run / tensors_name)).items() if k.startswith("velocity.")}
        state = json.loads((run / json_name).read_text(encoding="utf-8"))
    except Exception as exc:
        raise DataError(f"{run}: trainer state of epoch {epoch} unreadable ({type(exc).__name__}: {exc})") from None
    return velocity, state


def prune(run: Path, keep: int, best_epoch: int | None, latest: int) -> list[str]:
    """Keep the last KEEP checkpoints plus the best; trainer state only for the latest. Returns the
    names removed."""
    removed = []
    epochs = sorted(int(m.group(1)) for p in run.glob("ckpt-e*.safetensors") if (m := CKPT_RE.match(p.name)))
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
        except PluginError:
            raise PluginError(f"{path} was trained with {kind} {v['name']!r} from package {v['package']} "
                              f"{v['version']}, which is not installed: pip install {v['package']}") from None


def load_model(path: str | os.PathLike, device="cpu"):
    """The network of a checkpoint, rebuilt from its metadata alone, in eval mode; and the checkpoint."""
    from alexcli.model.registry import Arch, build_model

    ckpt = load_checkpoint(path)
    check_variants(ckpt.meta, ckpt.path)
    model, _ = build_model(Arch.from_dict(ckpt.meta["arch"]))
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as exc:
        raise DataError(f"{ckpt.path}: weights do not fit the architecture in its metadata ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt
