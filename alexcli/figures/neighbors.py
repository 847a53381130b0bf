"""`alexcli neighbors`: the training images nearest to a query in the last hidden layer (Figure 4, right).

The codes are what the architecture's `features()` returns (its declared `feature_layer`: fc7
after its ReLU for AlexNet, 4096 numbers at full width), from the centre crop in eval mode. The
training set's codes are computed once and cached beside the checkpoint as float16; the cache is
recomputed when the checkpoint or the data set changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alexcli import defaults
from alexcli.errors import DataError, UsageError
from alexcli.events import Advance, Begin, Progress, ignore
from alexcli.figures.plot import check_png, pyplot, save_figure, short
from alexcli.io import AtomicFile

FEATURES_FORMAT = "alexcli-features"
FEATURES_VERSION = 2     # 2: the layer is the architecture's declared feature layer
KEY_BYTES = 128          # room for a sample key in the cache (prepare's keys are at most 69 characters)


def features_fingerprint(ckpt_meta: dict, data_meta: dict, split: str, layer: str) -> str:
    """What the cached codes depend on: the checkpoint's weights and mean image (its stored sha256),
    the data set (its dataset.json fingerprint), the split, and how the codes are taken."""
    h = hashlib.sha256()
    h.update(f"{FEATURES_FORMAT}/{FEATURES_VERSION}\n{layer}, centre crop, float16\n".encode())
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
    1.28M x 4096 float16, 10.5 GB. Layout and header are fixed up front from the known shapes; the
    file is written under its temporary name and published when complete (alexcli.io)."""

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
        self.out = AtomicFile(path)
        self.out.file.write(len(raw).to_bytes(8, "little") + raw)
        self.out.file.truncate(self.base + offset)

    def put(self, name: str, row: int, values: torch.Tensor) -> None:
        """Write VALUES (consecutive rows starting at ROW) into tensor NAME."""
        start, shape, dtype = self.offsets[name]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
        self.out.file.seek(self.base + start + row * row_bytes)
        self.out.file.write(values.to(dtype).contiguous().cpu().numpy().tobytes())


def _key_bytes(keys: list[str], folder) -> torch.Tensor:
    out = torch.zeros(len(keys), KEY_BYTES, dtype=torch.uint8)
    for i, key in enumerate(keys):
        b = key.encode("utf-8")
        if len(b) > KEY_BYTES:
            raise DataError(f"{folder}: sample key {key[:40]!r}... is longer than {KEY_BYTES} bytes")
        out[i, :len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return out


def compute_features(model, mean_image, crop: int, split, out: Path, fingerprint: str, dim: int, layer: str, *,
                     batch: int = 128, workers: int = 0, device="cpu", progress: Progress = ignore) -> None:
    """The DIM-wide codes (`model.features`) of every image of SPLIT (centre crop, eval mode),
    written to OUT as float16 with each row's label, shard, position in the shard and key."""
    from alexcli.data import stream
    from alexcli.transforms import model_input, to_float

    dev = torch.device(device)
    n = split.samples
    starts = np.cumsum([0] + [s["samples"] for s in split.shards]).tolist()
    meta = {"format": FEATURES_FORMAT, "format_version": FEATURES_VERSION, "fingerprint": fingerprint,
            "layer": layer, "crop": "center", "dtype": "float16",
            "data": str(split.folder), "split": split.name, "shards": [s["name"] for s in split.shards]}
    specs = {"features": (torch.float16, (n, dim)), "labels": (torch.int64, (n,)), "shard": (torch.int32, (n,)),
             "index": (torch.int32, (n,)), "keys": (torch.uint8, (n, KEY_BYTES))}
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = _StreamedSafetensors(out, specs, {"alexcli": json.dumps(meta)})
    except OSError as exc:
        raise DataError(f"{out}: cannot write the feature cache ({exc.strerror or exc}); "
                        f"choose another place with --cache") from None
    done = 0
    try:
        progress(Begin(f"codes of {split.name}", n))
        with torch.no_grad():
            for images, labels, where in stream.batches(split, batch, train=False, workers=workers, keyed=True):
                x = model_input(to_float(images.to(dev)), mean_image, crop, "center")
                row = starts[where.shard] + int(where.positions[0])  # a keyed batch: consecutive samples of one shard
                writer.put("features", row, model.features(x).float().half())
                writer.put("labels", row, labels)
                writer.put("shard", row, torch.full((len(labels),), where.shard, dtype=torch.int32))
                writer.put("index", row, where.positions)
                writer.put("keys", row, _key_bytes(where.keys, split.folder))
                done += len(labels)
                progress(Advance(len(labels)))
        if done != n:
            raise DataError(f"{split.folder}: {done} {split.name} images read, but dataset.json lists {n}")
        writer.out.publish()
    except BaseException:
        writer.out.abort()
        raise


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


def _fetch(split, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[np.ndarray, str | None]]:
    """(decoded image, source path) of (shard, position) pairs, each needed shard read once. The
    source path is the one prepare records with each sample (`Sample.source`); None for a shard
    without one."""
    from alexcli.data.image import decode_rgb
    from alexcli.data.tar import read_samples

    got = {}
    for s in sorted({s for s, _ in wanted}):
        positions = {p for ss, p in wanted if ss == s}
        for pos, sample in enumerate(read_samples(split.path(split.shards[s]))):
            if pos in positions:
                got[(s, pos)] = (decode_rgb(sample.jpg), sample.source)
            if len(got) == len(wanted) or pos >= max(positions):
                break
    return got


def neighbors(ckpt_path, images: Sequence, data, *, split: str = defaults.NEIGHBORS_SPLIT,
              k: int = defaults.NEIGHBORS_K, device="cpu", batch: int = defaults.BATCH,
              workers: int = defaults.AUTO_WORKERS, cache=None, verify: bool = True, progress: Progress = ignore
              ) -> tuple[dict, torch.Tensor, dict]:
    """The K training images nearest to each query image in the last hidden layer's codes (the
    split's shards checked against their sha256 first, unless VERIFY is false).

    Returns (result, the queries as uint8 (N, 3, S, S), {neighbour key: HxWx3 uint8 image})."""
    from safetensors import safe_open

    from alexcli.checkpoint import read_meta
    from alexcli.data import stream
    from alexcli.data.dataset import class_names, open_split, read_manifest
    from alexcli.evaluate import load_scored
    from alexcli.figures.predict import image_params, load_images, true_label
    from alexcli.model.registry import architecture
    from alexcli.transforms import model_input, to_float

    if k < 1:
        raise UsageError(f"--k must be at least 1, not {k}")
    dev = torch.device(device)
    meta = read_meta(ckpt_path)
    sp = open_split(data, split, verify=verify, progress=progress)
    if list(meta["classes"]) != sp.classes:
        raise DataError(f"{sp.folder} has {len(sp.classes)} classes that differ from the {len(meta['classes'])} "
                        f"of {ckpt_path}; use the data set it was trained on")
    size = meta.get("data", {}).get("size")
    if size is not None and size != sp.size:
        raise DataError(f"{ckpt_path} was trained on {size}x{size} images but {sp.folder} holds {sp.size}x{sp.size}")
    pixels = load_images(images, image_params(meta))
    workers = stream.loader_workers(sp, 1, dev.type, workers)
    scored = load_scored(ckpt_path, dev)
    layer = architecture(scored.model.arch.name).feature_layer
    with torch.no_grad():
        x = model_input(to_float(pixels.to(dev)), scored.mean_image, scored.crop, "center")
        # rounded to float16 as the cached codes are, so both sides are at the same precision
        q = scored.model.features(x).float().half().float().cpu()
    dim = q.shape[1]
    fingerprint = features_fingerprint(meta, read_manifest(sp.folder), split, layer)
    cache = Path(cache) if cache is not None else features_cache_path(ckpt_path, split)
    found = _read_cache_meta(cache)
    reused = bool(found and found.get("fingerprint") == fingerprint and found["shape"] == [sp.samples, dim])
    if not reused:
        compute_features(scored.model, scored.mean_image, scored.crop, sp, cache, fingerprint, dim, layer,
                         batch=batch, workers=workers, device=dev, progress=progress)
    idx, dist = _nearest(q, cache, min(k, sp.samples))
    with safe_open(str(cache), framework="pt") as f:
        rows = sorted(set(idx.flatten().tolist()))
        info = {}
        for name in ("labels", "shard", "index", "keys"):
            sl = f.get_slice(name)
            info[name] = {r: sl[r:r + 1][0] for r in rows}
    names = class_names(scored.meta)
    wanted = {(int(info["shard"][r]), int(info["index"][r])) for r in rows}
    pics = _fetch(sp, wanted)
    result_rows = []
    for path, ii, dd in zip(images, idx.tolist(), dist.tolist()):
        nbrs = []
        for r, d in zip(ii, dd):
            label = int(info["labels"][r])
            key = bytes(info["keys"][r].numpy()).rstrip(b"\0").decode("utf-8")
            where = (int(info["shard"][r]), int(info["index"][r]))
            nbrs.append({"key": key, "shard": sp.shards[where[0]]["name"], "position": where[1],
                         "source": pics[where][1], "index": label, "class": sp.classes[label],
                         "name": names[label], "distance": d})
        truth = true_label(path, sp.classes)  # as predict labels an image: the class its folder names
        result_rows.append({"image": str(path),
                            "label": None if truth is None else {"index": truth, "class": sp.classes[truth],
                                                                 "name": names[truth]},
                            "neighbors": nbrs})
    shard_index = {e["name"]: i for i, e in enumerate(sp.shards)}
    pictures = {n["key"]: pics[(shard_index[n["shard"]], n["position"])][0]
                for q in result_rows for n in q["neighbors"]}
    result = {"checkpoint": str(ckpt_path), "data": str(sp.folder), "split": split, "k": int(idx.shape[1]),
              "features": {"cache": str(cache), "reused": reused, "images": sp.samples, "dim": dim,
                           "layer": layer, "dtype": "float16"},
              "queries": result_rows}
    return result, pixels, pictures


def tail(text: str, n: int) -> str:
    """TEXT cut to N characters from the left (a path's file name is what tells two apart)."""
    return text if len(text) <= n else "\u2026" + text[-(n - 1):]


def draw_neighbors(result: dict, queries: torch.Tensor, pictures: dict, out) -> Path:
    """Figure 4 (right): each query in the first column (its file name above, the class its
    folder names below when it names one), its nearest training images to its right with their
    class and distance above and their source file below (shard:key when the shard records none)."""
    out = check_png(out)
    plt = pyplot()
    rows = len(result["queries"])
    k = result["k"]
    row_h = 2.0
    fig = plt.figure(figsize=(1.45 * (k + 1) + 0.25, row_h * rows + 0.1))
    grid = fig.add_gridspec(rows, k + 2, width_ratios=[1, 0.12] + [1] * k, wspace=0.06, hspace=0.55,
                            left=0.01, right=0.99, top=1 - 0.45 / (row_h * rows + 0.1),
                            bottom=0.28 / (row_h * rows + 0.1))
    for r, (row, img) in enumerate(zip(result["queries"], queries)):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(f"query\n{short(Path(row['image']).name, 20)}", fontsize=7, fontweight="bold")
        label = row.get("label")
        ax.set_xlabel(f"label: {short(label['name'], 14)}" if label else "no label", fontsize=7,
                      fontweight="bold" if label else "normal", labelpad=2)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("#d7301f")
            spine.set_linewidth(2)
        for c, nb in enumerate(row["neighbors"]):
            ax = fig.add_subplot(grid[r, c + 2])
            ax.imshow(pictures[nb["key"]])
            same = label is not None and nb["index"] == label["index"]
            ax.set_title(f"{short(nb['name'], 16)}\nd = {nb['distance']:.2f}", fontsize=7,
                         fontweight="bold" if same else "normal")
            name = Path(nb["source"]).name if nb.get("source") else f"{nb['shard']}:{nb['key']}"
            ax.set_xlabel(tail(name, 22), fontsize=6, labelpad=2)
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, out)
