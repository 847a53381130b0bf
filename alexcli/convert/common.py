"""What every import shares: the `Imported` a reader returns, the class list, and writing it as an
ordinary alexcli checkpoint that eval, ensemble, predict, kernels, neighbors and `train --init` read
like any other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alexcli.errors import DataError, UsageError

# ImageNet's RGB PCA on the 0..1 scale as fb.resnet.torch publishes it (datasets/imagenet.lua; the
# values docs/design.md compares alexcli's own statistics with). Every checkpoint carries its data
# set's PCA; an imported one has no data set of alexcli's, so it carries ImageNet's.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


@dataclass
class Imported:
    """A pretrained network read from another tool's file, in alexcli's terms."""

    kind: str                      # "torchvision", "caffe"
    source: Path                   # the file read
    arch: object                   # alexcli.model.arch.Arch it is an instance of
    state_dict: dict               # alexcli's parameter names (conv1.weight, ...) -> float32 tensors
    mean_image: object             # (3, size, size) float32 tensor, RGB, 0..1 scale: subtracted from the input
    size: int                      # the image side the network's inputs are cropped from (prepare --size)
    mapping: list = field(default_factory=list)  # {"from", "to", "shape"} per tensor, in order
    notes: list = field(default_factory=list)    # what was changed on the way (BGR -> RGB, std folded in)
    reported: dict = field(default_factory=dict)  # the publisher's own top-1/top-5 accuracy, centre crop
    sha256: str | None = None      # of SOURCE, when the reader had its bytes (else save_imported reads it again)


def file_sha256(path: Path) -> str:
    from alexcli.data.dataset import sha256_file

    return sha256_file(Path(path))


def read_classes(path, count: int) -> tuple[list[str], list[str]]:
    """(ids, names) from a class list file: one class per line in the network's output order,
    either `ID NAME...` (Kaggle's LOC_synset_mapping.txt, Caffe's synset_words.txt: `n01440764
    tench, Tinca tinca`) or an ID alone; its NAME is the text up to the first comma."""
    from alexcli.data.scan import read_text

    path = Path(path)
    try:
        text = read_text(path)
    except DataError as exc:
        raise DataError(f"--classes {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != count:
        raise DataError(f"--classes {path}: lists {len(lines)} classes, but the network has {count} outputs")
    ids, names = [], []
    for line in lines:
        cid, _, rest = line.partition(" ")
        ids.append(cid)
        names.append(rest.split(",")[0].strip() or cid)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"--classes {path}: class {dup!r} is listed twice")
    return ids, names


def classes_of_data(folder, count: int) -> tuple[list[str], list[str]]:
    """(ids, names) of a prepared data set (its dataset.json), which must have COUNT classes."""
    from alexcli.data.dataset import class_names, read_manifest

    manifest = read_manifest(Path(folder))
    classes = list(manifest["classes"])
    if len(classes) != count:
        raise DataError(f"--data {folder}: has {len(classes)} classes, but the network has {count} outputs")
    return classes, class_names(manifest)


def _is_checkpoint(path: Path) -> bool:
    from alexcli.checkpoint import read_meta

    try:
        read_meta(path, check=False)
    except DataError:
        return False
    return True


def check_out(out: Path, overwrite: bool, suffix: str = ".safetensors", files: str = "checkpoints",
              kind: str = "an alexcli checkpoint", ours: Callable[[Path], bool] = _is_checkpoint) -> Path:
    """--out as the path of the file import or export writes: a name ending in SUFFIX (FILES are
    SUFFIX files), not a folder; an existing file only with --overwrite, and only when OURS says it
    is KIND (nothing else is replaced)."""
    out = Path(out)
    if out.suffix != suffix:
        raise UsageError(f"--out {out}: {files} are {suffix} files; give a name ending in {suffix}")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name ending in {suffix}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UsageError(f"--out {out}: exists; choose another name or add --overwrite")
        if not ours(out):
            raise UsageError(f"--out {out}: exists and is not {kind}; alexcli replaces only its own files: move it "
                             f"away or choose another name")
    return out


def save_imported(imp: Imported, out: Path, classes: list[str], names: list[str]) -> dict:
    """Write IMP as an alexcli checkpoint at OUT (atomically); returns the summary `--json` prints.
    The weights are loaded into the architecture strictly first, so a file that does not fit is a
    DataError naming it and nothing is written."""
    import torch

    from alexcli import __version__
    from alexcli import checkpoint as ck
    from alexcli.model.registry import build_model, count_parameters

    model, used = build_model(imp.arch)
    try:
        model.load_state_dict(imp.state_dict, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{imp.source}: its weights do not fit {imp.arch.name} ({str(exc).splitlines()[0]})") from None
    data = {"mean_image": imp.mean_image.float().contiguous(),
            "pca_eigval": torch.tensor(IMAGENET_EIGVAL, dtype=torch.float32),
            "pca_eigvec": torch.tensor(IMAGENET_EIGVEC, dtype=torch.float32)}
    imported = {"kind": imp.kind, "file": str(imp.source.resolve()), "sha256": imp.sha256 or file_sha256(imp.source),
                "notes": list(imp.notes), "reported": dict(imp.reported), "alexcli_version": __version__}
    meta = {"arch": imp.arch.to_dict(), "variants": used, "augment": ["mean"], "classes": list(classes),
            "class_names": list(names), "data": {"folder": None, "size": imp.size, "train_images": None},
            "parameters": count_parameters(model), "init": imp.arch.init, "epoch": None, "imported": imported}
    out.parent.mkdir(parents=True, exist_ok=True)
    ck.save_checkpoint(out, model.state_dict(), data, meta)
    return {"out": str(out), "kind": imp.kind, "source": str(imp.source), "sha256": imported["sha256"],
            "arch": imp.arch.to_dict(), "parameters": meta["parameters"], "classes": len(classes),
            "size": imp.size, "crop": imp.arch.crop, "mapping": imp.mapping, "notes": imp.notes,
            "reported": imp.reported}


def checked_names(source: Path, found, expected, what: str) -> None:
    """FOUND's names must be exactly EXPECTED's: else a one-line DataError naming SOURCE, WHAT it
    should have been, and the first names missing and unexpected."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        parts = []
        for word, names in (("missing", missing), ("has", extra)):
            if names:
                parts.append(f"{word} {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        raise DataError(f"{source}: not {what} ({'; '.join(parts)})")


def checked_tensors(source: Path, found: dict, expected: dict, what: str) -> None:
    """FOUND (name -> tensor) must hold exactly EXPECTED's names (name -> shape, None for any
    first dimension where the class count goes): else a one-line DataError naming SOURCE, WHAT it
    should have been, and the first names missing, unexpected or of the wrong shape."""
    checked_names(source, found, expected, what)
    for name, shape in expected.items():
        got = tuple(found[name].shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            want = "x".join("N" if s is None else str(s) for s in shape)
            raise DataError(f"{source}: {name} has shape {'x'.join(map(str, got))}, {what} has {want}")

