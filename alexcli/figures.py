"""The paper's qualitative results (section 6.1) from any checkpoint.

- `predict`: the most probable labels of any image a user has, with their probabilities, and
  Figure 4 (left): each image above a bar chart of its top-5 probabilities.
- `kernel_grid`: the conv1 kernels as one picture (Figure 3), a row block per column.
- `neighbors`: the training images whose last-hidden-layer codes (fc7 after its ReLU, 4096-d at
  full width) are nearest to a query's in Euclidean distance (Figure 4, right). The training
  set's codes are computed once and cached beside the checkpoint.

A user's image goes through exactly what `alexcli prepare` does to a source file (shorter side
scaled to the data size, central square kept, written as JPEG and decoded again), then through
what `alexcli eval` does (mean image, centre crop or ten patches). Every picture is a PNG
written under a temporary name and renamed. Nothing here prints.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from alexcli.errors import DataError, UsageError

FEATURES_FORMAT = "alexcli-features"
FEATURES_VERSION = 1
KEY_BYTES = 128          # room for a sample key in the cache (prepare's keys are at most 69 characters)
KERNELS_PER_ROW = 16     # Figure 3 shows each column's 48 kernels as 3 rows of 16
ProgressFn = Callable[[str, int], None]


# ---------------------------------------------------------------- shared pieces

def _check_png(out) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: pictures are written as PNG; give a name ending in .png")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name ending in .png")
    return out


def _write_atomic(out: Path, write: Callable[[Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _save_figure(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        _write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_names(meta: dict) -> list[str]:
    return list(meta.get("class_names") or meta["classes"])


def image_params(meta: dict):
    """How prepare converted the checkpoint's training images: its data set's parameters when that
    folder is still here, else prepare's defaults at the checkpoint's image size."""
    from alexcli.data.image import ImageParams

    data = meta.get("data", {})
    params = {}
    folder = data.get("folder")
    if folder and (Path(folder) / "dataset.json").is_file():
        try:
            params = json.loads((Path(folder) / "dataset.json").read_text(encoding="utf-8")).get("parameters", {})
        except (OSError, ValueError):
            params = {}
    size = int(data.get("size") or params.get("size") or ImageParams.size)
    return ImageParams(size=size, quality=int(params.get("quality", ImageParams.quality)),
                       resample=params.get("resample", ImageParams.resample),
                       max_pixels=int(params.get("max_pixels", ImageParams.max_pixels)))


def load_image(path, params) -> torch.Tensor:
    """Any image file -> uint8 (3, S, S): the pixels the network would see had prepare written it."""
    from alexcli.data.image import Reject, convert
    from alexcli.train.loader import decode_batch

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        jpg, _ = convert(data, params)
    except Reject as exc:
        raise DataError(f"{path}: {exc}") from None
    return decode_batch([jpg])[0].contiguous()  # decoded as the training loader decodes


def load_images(paths: Sequence, params) -> torch.Tensor:
    """All of PATHS as one uint8 batch; the first unusable file is an error naming it."""
    if not paths:
        raise UsageError("give at least one image")
    return torch.stack([load_image(p, params) for p in paths])


def _true_label(path, classes: list[str]) -> int | None:
    """The class an image's folder names, as in ImageNet's layout (.../n01440764/x.JPEG); else None."""
    parent = Path(path).resolve().parent.name
    return classes.index(parent) if parent in classes else None


def _device(device) -> torch.device:
    return torch.device(device)


# ---------------------------------------------------------------- predict (Figure 4, left)

def predict(ckpt_path, images: Sequence, *, crops: str = "center", top: int = 5,
            device="cpu") -> tuple[dict, torch.Tensor]:
    """The TOP most probable classes of each image. Returns (result, uint8 images (N, 3, S, S))."""
    from alexcli.augment import to_float
    from alexcli.evaluate import CROPS, load_scored, model_probs
    from alexcli.train.checkpoint import read_meta

    if crops not in CROPS:
        raise UsageError(f"--crops must be one of {', '.join(CROPS)}, not {crops!r}")
    if top < 1:
        raise UsageError(f"--top must be at least 1, not {top}")
    dev = _device(device)
    meta = read_meta(ckpt_path)
    pixels = load_images(images, image_params(meta))  # every file checked before the model is loaded
    scored = load_scored(ckpt_path, dev)
    names = class_names(scored.meta)
    probs = model_probs(scored.model, to_float(pixels.to(dev)), scored.mean_image, scored.crop, crops).cpu()
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    rows = []
    for path, p, v, i in zip(images, probs, values.tolist(), indices.tolist()):
        label = _true_label(path, scored.classes)
        rows.append({
            "image": str(path),
            "label": None if label is None else {"index": label, "class": scored.classes[label], "name": names[label],
                                                 "probability": float(p[label]), "rank": int((p > p[label]).sum()) + 1},
            "top": [{"index": c, "class": scored.classes[c], "name": names[c], "probability": pr}
                    for pr, c in zip(v, i)],
        })
    return {"checkpoint": str(ckpt_path), "crops": crops, "size": int(pixels.shape[-1]), "images": rows}, pixels


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def percent(p: float) -> str:
    """A probability as the tables and figures show it: one decimal, "<0.1%" below that."""
    return "<0.1%" if p < 0.0005 else f"{p:.1%}"


def draw_predictions(result: dict, pixels: torch.Tensor, out) -> Path:
    """Figure 4 (left): each image with its top-k probabilities as bars beneath it. The bar of the
    image's own class (when its folder names one) is red, as in the paper; the others blue."""
    out = _check_png(out)
    plt = _pyplot()
    n = len(result["images"])
    cols = min(n, 4)
    rows = -(-n // cols)
    k = max(len(r["top"]) for r in result["images"])
    fig = plt.figure(figsize=(2.5 * cols, 3.7 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.16, wspace=0.15, left=0.03, right=0.97,
                             top=1 - 0.3 / (3.7 * rows), bottom=0.02)
    for j, (row, img) in enumerate(zip(result["images"], pixels)):
        r, c = divmod(j, cols)
        cell = outer[r, c].subgridspec(2, 1, height_ratios=[2.2, 0.22 * k + 0.2], hspace=0.12)
        ax = fig.add_subplot(cell[0])
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_short(Path(row["image"]).name, 28), fontsize=8)
        if row["label"] is not None:
            ax.set_xlabel(_short(row["label"]["name"], 30), fontsize=9, fontweight="bold")
        bars = fig.add_subplot(cell[1])
        top = row["top"]
        truth = row["label"]["index"] if row["label"] is not None else None
        y = np.arange(len(top))
        colours = ["#d7301f" if t["index"] == truth else "#9ecae1" for t in top]
        bars.barh(y, [t["probability"] for t in top], color=colours, height=0.8)
        for yy, t in zip(y, top):
            bars.text(0.01, yy, f"{_short(t['name'], 26)}  {percent(t['probability'])}", va="center", ha="left",
                      fontsize=7)
        bars.set_xlim(0, 1)
        bars.set_ylim(len(top) - 0.5, -0.5)
        bars.set_xticks([])
        bars.set_yticks([])
    _save_figure(fig, out)
    return out


# ---------------------------------------------------------------- kernels (Figure 3)

def normalise_kernels(weight: torch.Tensor) -> np.ndarray:
    """(C, 3, k, k) weights -> (C, k, k, 3) floats in 0..1, each kernel min-max scaled on its own
    (a kernel whose weights are all equal becomes mid grey)."""
    w = weight.detach().float().cpu().numpy()
    lo = w.reshape(len(w), -1).min(1)[:, None, None, None]
    hi = w.reshape(len(w), -1).max(1)[:, None, None, None]
    span = hi - lo
    norm = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    return norm.transpose(0, 2, 3, 1)


def kernel_layout(count: int, groups: int, size: int, scale: int, per_row: int = KERNELS_PER_ROW) -> dict:
    """Where each kernel goes. Each column's COUNT/GROUPS kernels fill rows of PER_ROW (fewer when
    a column has fewer); tiles are SIZE*SCALE pixels with SCALE pixels of white between and
    around them, and a column's block starts 4*SCALE pixels below the previous one.
    Returns {"width", "height", "tile", "origins": [(top, left) per kernel]}."""
    per_col = count // groups
    across = min(per_row, per_col)
    down = -(-per_col // across)
    tile, pad, gap = size * scale, scale, 4 * scale
    block_h = down * tile + (down + 1) * pad
    width = across * tile + (across + 1) * pad
    height = groups * block_h + (groups - 1) * gap
    origins = []
    for i in range(count):
        g, j = divmod(i, per_col)
        r, c = divmod(j, across)
        origins.append((g * (block_h + gap) + pad + r * (tile + pad), pad + c * (tile + pad)))
    return {"width": width, "height": height, "tile": tile, "origins": origins, "per_row": across, "rows": down}


def kernel_grid(weight: torch.Tensor, groups: int, scale: int = 4) -> tuple[np.ndarray, dict]:
    """conv1 WEIGHT (C, 3, k, k) -> an RGB uint8 picture (H, W, 3) and its layout: each kernel
    min-max normalised on its own and enlarged SCALE times (nearest neighbour), the first C/2
    kernels (column 0) above the other C/2 (column 1) when GROUPS is 2."""
    if scale < 1:
        raise UsageError(f"--scale must be at least 1, not {scale}")
    count, _, size, _ = weight.shape
    layout = kernel_layout(count, groups, size, scale)
    norm = normalise_kernels(weight)
    tiles = np.rint(norm * 255).astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((layout["height"], layout["width"], 3), 255, np.uint8)
    t = layout["tile"]
    for tile, (top, left) in zip(tiles, layout["origins"]):
        canvas[top:top + t, left:left + t] = tile
    return canvas, layout


def write_kernels(ckpt_path, out, *, scale: int = 4) -> dict:
    """Figure 3 from a checkpoint, written to OUT (PNG)."""
    from PIL import Image

    from alexcli.train.checkpoint import load_checkpoint

    out = _check_png(out)
    if scale < 1:
        raise UsageError(f"--scale must be at least 1, not {scale}")
    ckpt = load_checkpoint(ckpt_path)
    weight = ckpt.model_state.get("conv1.weight")
    if weight is None or weight.dim() != 4 or weight.shape[1] != 3:
        raise DataError(f"{ckpt_path}: no conv1 weights of shape (C, 3, k, k) in it")
    groups = int(ckpt.meta.get("arch", {}).get("groups", 1))
    groups = groups if weight.shape[0] % groups == 0 else 1
    canvas, layout = kernel_grid(weight, groups, scale)
    _write_atomic(out, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))
    return {"out": str(out), "kernels": int(weight.shape[0]), "columns": groups,
            "kernel_size": [int(weight.shape[2]), int(weight.shape[3])], "scale": scale,
            "pixels": [layout["width"], layout["height"]], "normalisation": "min-max per kernel"}


# ---------------------------------------------------------------- neighbours (Figure 4, right)

def _decode(jpg: bytes) -> np.ndarray:
    """A stored JPEG -> HxWx3 uint8, decoded as the loader does (PIL, RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def shard_samples(folder: Path, entry: dict) -> Iterator[tuple[str, bytes, int]]:
    """(key, jpg bytes, class) of each sample of one shard, in the order written, read with
    webdataset's tar reader and key grouping (the loader's rules)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = Path(folder) / entry["name"]
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    n = 0
    with stream:
        for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
            if "jpg" not in sample or "cls" not in sample:
                raise DataError(f"{path}: sample {sample.get('__key__')!r} lacks jpg or cls")
            n += 1
            yield sample["__key__"], sample["jpg"], int(sample["cls"])
    if n != entry["samples"]:
        raise DataError(f"{path}: {n} samples read, but dataset.json says {entry['samples']} (truncated or replaced)")


class _KeyedBatches(torch.utils.data.IterableDataset):
    """Decoded batches that know where each image came from: (uint8 (B, 3, S, S), labels, shard
    indices, positions in the shard, keys). Each worker reads whole shards (i::workers)."""

    def __init__(self, folder: Path, shards: list[dict], batch: int):
        self.folder, self.shards, self.batch = folder, shards, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # a decoding process; in the main process the network keeps its threads
            torch.set_num_threads(1)
        try:
            for s in range(wid, len(self.shards), workers):
                buf = []
                for pos, (key, jpg, label) in enumerate(shard_samples(self.folder, self.shards[s])):
                    buf.append((pos, key, jpg, label))
                    if len(buf) == self.batch:
                        yield self._pack(s, buf)
                        buf = []
                if buf:
                    yield self._pack(s, buf)
        except DataError as exc:  # carried to the main process as a value: one clean line there
            yield str(exc)

    @staticmethod
    def _pack(shard: int, buf: list) -> tuple:
        try:
            images = np.stack([_decode(jpg) for _, _, jpg, _ in buf])
        except (OSError, ValueError) as exc:
            raise DataError(f"undecodable image among samples {buf[0][1]!r} to {buf[-1][1]!r} ({exc})") from None
        return (torch.from_numpy(images).permute(0, 3, 1, 2), torch.tensor([b[3] for b in buf]),
                shard, torch.tensor([b[0] for b in buf]), [b[1] for b in buf])


def features_fingerprint(ckpt_meta: dict, data_meta: dict, split: str) -> str:
    """What the cached codes depend on: the checkpoint's weights and mean image (its stored sha256),
    the data set (its dataset.json fingerprint), the split, and how the codes are taken."""
    h = hashlib.sha256()
    h.update(f"{FEATURES_FORMAT}/{FEATURES_VERSION}\nfc7 relu, centre crop, float16\n".encode())
    h.update(f"{ckpt_meta.get('sha256')}\n{data_meta.get('fingerprint')}\n{split}\n".encode())
    return h.hexdigest()


def features_cache_path(ckpt_path, split: str) -> Path:
    """features-<checkpoint stem>-<split>.safetensors beside the checkpoint. The name does not start
    with ckpt- so a shell glob like ckpt-*.safetensors never picks a cache up as a checkpoint."""
    p = Path(ckpt_path)
    return p.with_name(f"features-{p.stem}-{split}.safetensors")


def _read_cache_meta(path: Path) -> dict | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("alexcli", "null"))
            shape = f.get_slice("features").get_shape()
    except Exception:
        return None
    if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
        return None
    return dict(meta, shape=list(shape))


class _StreamedSafetensors:
    """A safetensors file whose tensors are written in place as they are computed (rows in any
    order), so the training set's codes never have to be held in memory at once: ImageNet's are
    1.28M x 4096 float16, 10.5 GB. Layout and header are fixed up front from the known shapes."""

    DTYPES = {torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header, offset, self.offsets = {"__metadata__": metadata}, 0, {}
        for name, (dtype, shape) in specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
            header[name] = {"dtype": self.DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, shape, dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file.truncate(self.base + offset)

    def put(self, name: str, row: int, values: torch.Tensor) -> None:
        """Write VALUES (consecutive rows starting at ROW) into tensor NAME."""
        start, shape, dtype = self.offsets[name]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
        self.file.seek(self.base + start + row * row_bytes)
        self.file.write(values.to(dtype).contiguous().cpu().numpy().tobytes())

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def compute_features(model, mean_image, crop: int, split, out: Path, fingerprint: str, *, batch: int = 128,
                     workers: int = 0, device="cpu", progress: ProgressFn | None = None) -> None:
    """The last hidden layer's codes of every image of SPLIT (centre crop, eval mode), written to
    OUT as float16 with each row's label, shard, position in the shard and key."""
    from alexcli.augment import to_float
    from alexcli.evaluate import model_input

    dev = _device(device)
    n = split.samples
    dim = model.fc7.out_features
    starts = np.cumsum([0] + [s["samples"] for s in split.shards]).tolist()
    meta = {"format": FEATURES_FORMAT, "format_version": FEATURES_VERSION, "fingerprint": fingerprint,
            "layer": "fc7 (after its activation)", "crop": "center", "dtype": "float16",
            "data": str(split.folder), "split": split.name, "shards": [s["name"] for s in split.shards]}
    specs = {"features": (torch.float16, (n, dim)), "labels": (torch.int64, (n,)), "shard": (torch.int32, (n,)),
             "index": (torch.int32, (n,)), "keys": (torch.uint8, (n, KEY_BYTES))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        writer = _StreamedSafetensors(tmp, specs, {"alexcli": json.dumps(meta)})
    except OSError as exc:
        raise DataError(f"{out}: cannot write the feature cache ({exc.strerror or exc}); "
                        f"choose another place with --cache") from None
    done = 0
    try:
        stream = _KeyedBatches(split.folder, split.shards, batch)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        if progress:
            progress("total", n)
        with torch.no_grad():
            for item in loader:
                if isinstance(item, str):
                    raise DataError(item)
                images, labels, shard, index, keys = item
                x = model_input(to_float(images.to(dev)), mean_image, crop, "center")
                codes = model.features(x).float()
                row = starts[shard] + int(index[0])  # a batch is consecutive samples of one shard
                keyb = torch.zeros(len(keys), KEY_BYTES, dtype=torch.uint8)
                for i, key in enumerate(keys):
                    b = key.encode("utf-8")
                    if len(b) > KEY_BYTES:
                        raise DataError(f"{split.folder}: sample key {key[:40]!r}... is longer than {KEY_BYTES} bytes")
                    keyb[i, :len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
                writer.put("features", row, codes.half())
                writer.put("labels", row, labels)
                writer.put("shard", row, torch.full((len(keys),), shard, dtype=torch.int32))
                writer.put("index", row, index)
                writer.put("keys", row, keyb)
                done += len(keys)
                if progress:
                    progress("advance", len(keys))
        writer.close()
        if done != n:
            raise DataError(f"{split.folder}: {done} {split.name} images read, but dataset.json lists {n}")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out)
    finally:
        if not writer.file.closed:
            writer.file.close()
        tmp.unlink(missing_ok=True)


def _nearest(queries: torch.Tensor, cache: Path, k: int, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and Euclidean distances of the K cached rows nearest to each query, best first.

    The cache is read chunk by chunk (memory stays bounded for ImageNet's 10 GB of codes); each
    chunk's candidates are found with |q|^2 - 2 q.f + |f|^2 and their distances then recomputed
    from the difference itself, so an image's distance to its own code is 0, not rounding noise."""
    from safetensors import safe_open

    q = queries.float()
    best_d = torch.full((len(q), 0), 0.0)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    with safe_open(str(cache), framework="pt") as f:
        sl = f.get_slice("features")
        n, dim = sl.get_shape()
        chunk = chunk or max(256, 2 ** 25 // max(1, dim))  # 8192 rows of 4096: 128 MB as float32
        for a in range(0, n, chunk):
            feats = sl[a:min(n, a + chunk)].float()
            d2 = (q * q).sum(1, keepdim=True) - 2 * q @ feats.T + (feats * feats).sum(1)[None]
            m = min(len(feats), k + 8)
            cand = d2.topk(m, dim=1, largest=False).indices
            exact = (feats[cand] - q[:, None]).norm(dim=2)
            best_d = torch.cat([best_d, exact], 1)
            best_i = torch.cat([best_i, cand + a], 1)
            keep = best_d.topk(min(k, best_d.shape[1]), dim=1, largest=False)
            best_d, best_i = keep.values, best_i.gather(1, keep.indices)
    return best_i, best_d


def _fetch(folder: Path, shards: list[dict], wanted: set[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Decoded images of (shard, position) pairs, each needed shard read once."""
    got = {}
    for s in sorted({s for s, _ in wanted}):
        positions = {p for ss, p in wanted if ss == s}
        for pos, (_, jpg, _) in enumerate(shard_samples(folder, shards[s])):
            if pos in positions:
                got[(s, pos)] = _decode(jpg)
            if len(got) == len(wanted) or pos > max(positions):
                break
    return got


def neighbors(ckpt_path, images: Sequence, data, *, split: str = "train", k: int = 6, device="cpu",
              batch: int = 128, workers: int = 0, cache=None, progress: ProgressFn | None = None
              ) -> tuple[dict, torch.Tensor, dict]:
    """The K training images nearest to each query image in the last hidden layer's codes.

    Returns (result, the queries as uint8 (N, 3, S, S), {neighbour key: HxWx3 uint8 image})."""
    from safetensors import safe_open

    from alexcli.augment import to_float
    from alexcli.data.shards import read_manifest
    from alexcli.evaluate import load_scored, model_input
    from alexcli.train import loader
    from alexcli.train.checkpoint import read_meta

    if k < 1:
        raise UsageError(f"--k must be at least 1, not {k}")
    dev = _device(device)
    meta = read_meta(ckpt_path)
    sp = loader.open_split(data, split)
    if list(meta["classes"]) != sp.classes:
        raise DataError(f"{sp.folder} has {len(sp.classes)} classes that differ from the {len(meta['classes'])} "
                        f"of {ckpt_path}; use the data set it was trained on")
    size = meta.get("data", {}).get("size")
    if size is not None and size != sp.size:
        raise DataError(f"{ckpt_path} was trained on {size}x{size} images but {sp.folder} holds {sp.size}x{sp.size}")
    pixels = load_images(images, image_params(meta))
    if workers < 0:  # a quarter of the cores on the CPU (the network needs the rest), up to 8 on a GPU
        workers = loader.auto_workers(sp, 1, max(0, (torch.get_num_threads() if dev.type == "cpu" else 8) // 4))
    scored = load_scored(ckpt_path, dev)
    fingerprint = features_fingerprint(meta, read_manifest(sp.folder), split)
    cache = Path(cache) if cache is not None else features_cache_path(ckpt_path, split)
    found = _read_cache_meta(cache)
    dim = scored.model.fc7.out_features
    reused = bool(found and found.get("fingerprint") == fingerprint and found["shape"] == [sp.samples, dim])
    if not reused:
        compute_features(scored.model, scored.mean_image, scored.crop, sp, cache, fingerprint, batch=batch,
                         workers=workers, device=dev, progress=progress)
    with torch.no_grad():
        x = model_input(to_float(pixels.to(dev)), scored.mean_image, scored.crop, "center")
        # rounded to float16 as the cached codes are, so both sides are at the same precision
        q = scored.model.features(x).half().float().cpu()
    idx, dist = _nearest(q, cache, min(k, sp.samples))
    with safe_open(str(cache), framework="pt") as f:
        rows = sorted(set(idx.flatten().tolist()))
        info = {}
        for name in ("labels", "shard", "index", "keys"):
            sl = f.get_slice(name)
            info[name] = {r: sl[r:r + 1][0] for r in rows}
    names = class_names(scored.meta)
    wanted = {(int(info["shard"][r]), int(info["index"][r])) for r in rows}
    result_rows = []
    for path, ii, dd in zip(images, idx.tolist(), dist.tolist()):
        nbrs = []
        for r, d in zip(ii, dd):
            label = int(info["labels"][r])
            key = bytes(info["keys"][r].numpy()).rstrip(b"\0").decode("utf-8")
            nbrs.append({"key": key, "shard": sp.shards[int(info["shard"][r])]["name"],
                         "position": int(info["index"][r]), "index": label, "class": sp.classes[label], "name": names[label], "distance": d})
        result_rows.append({"image": str(path), "neighbors": nbrs})
    pics = _fetch(sp.folder, sp.shards, wanted)
    shard_index = {e["name"]: i for i, e in enumerate(sp.shards)}
    pictures = {n["key"]: pics[(shard_index[n["shard"]], n["position"])] for q in result_rows for n in q["neighbors"]}
    result = {"checkpoint": str(ckpt_path), "data": str(sp.folder), "split": split, "k": int(idx.shape[1]),
              "features": {"cache": str(cache), "reused": reused, "images": sp.samples, "dim": dim,
                           "dtype": "float16"},
              "queries": result_rows}
    return result, pixels, pictures


def draw_neighbors(result: dict, queries: torch.Tensor, pictures: dict, out) -> Path:
    """Figure 4 (right): each query in the first column, its nearest training images to its right
    with their class and distance."""
    out = _check_png(out)
    plt = _pyplot()
    rows = len(result["queries"])
    k = result["k"]
    fig = plt.figure(figsize=(1.45 * (k + 1) + 0.25, 1.75 * rows + 0.1))
    grid = fig.add_gridspec(rows, k + 2, width_ratios=[1, 0.12] + [1] * k, wspace=0.06, hspace=0.38,
                            left=0.01, right=0.99, top=1 - 0.45 / (1.75 * rows + 0.1), bottom=0.01)
    for r, (row, img) in enumerate(zip(result["queries"], queries)):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(f"query\n{_short(Path(row['image']).name, 20)}", fontsize=7, fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("#d7301f")
            spine.set_linewidth(2)
        for c, nb in enumerate(row["neighbors"]):
            ax = fig.add_subplot(grid[r, c + 2])
            ax.imshow(pictures[nb["key"]])
            ax.set_title(f"{_short(nb['name'], 16)}\nd = {nb['distance']:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    _save_figure(fig, out)
    return out
