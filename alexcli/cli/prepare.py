from __future__ import annotations

from pathlib import Path

import typer

from alexcli.choices import Resample
from alexcli.cli._ui import Reporter, emit_json, json_option, out
from alexcli.data.config import MAX_SIZE, PrepareConfig as P


def render_summary(s: dict) -> None:
    from rich.table import Table  # rich on first use (alexcli.cli._ui._LazyConsole)

    table = Table(title=f"{s['out']}  ({s['status']}, {s['classes']} classes)", title_justify="left")
    for col in ("split", "found", "written", "rejected", "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, v in s["splits"].items():
        table.add_row(split, f"{v['found']:,}", f"{v['written']:,}", f"{v['rejected']:,}", str(v["shards"]))
    out.print(table)
    out.print(f"{s['found']:,} found = {s['written']:,} written + {s['rejected']:,} rejected"
              + (f" (reasons in {s['rejected_file']})" if s["rejected"] else "")
              + (f"; {s['skipped']:,} hidden files skipped (.DS_Store, ._* and the like)" if s.get("skipped") else ""))
    if "class_names_from" in s:
        out.print(f"class names: {s['class_names_from']}")
    if s.get("upscaled"):
        out.print(f"upscaled: {s['upscaled']:,} images were smaller than {s['size']}x{s['size']} and were enlarged")
    if "stats" in s:
        st = s["stats"]
        out.print(f"statistics over the training pixels {st['pixels']}: RGB mean "
                  + " ".join(f"{v:.4f}" for v in st["rgb_mean"]) + ", PCA eigenvalues "
                  + " ".join(f"{v:.4g}" for v in st["pca_eigval"]))
    for note in s.get("notes", []):
        out.print(f"note: {note}")
    for warning in s.get("warnings", []):
        out.print(f"[yellow]warning:[/] {warning}")
    rate = f", {s['images_per_s']:,.0f} images/s" if s.get("images_per_s") else ""
    pil = s["pil"]
    out.print(f"{s['seconds']:.1f} s{rate}; PIL: {pil['package']} {pil['version']}")


def prepare_command(
    src: Path = typer.Argument(..., help="An image tree (SRC/train/<class>/<image>, optionally SRC/val and SRC/test), "
                                         "or the archives as downloaded: a folder holding ILSVRC2012_img_train.tar "
                                         "(+ _img_val.tar, _devkit_t12.tar.gz), the Kaggle tree or zip, "
                                         "CIFAR-10/100 as downloaded (cifar-10-python.tar.gz, cifar-100-python.tar.gz, "
                                         "the -binary versions), or the archive itself."),
    out_dir: Path = typer.Option(None, "--out", help="Output folder (default: shards/<name of SRC>)."),
    size: int = typer.Option(P.size, min=8, max=MAX_SIZE, help="Side of the square images written (section 2: 256). A JPEG "
                                                 "that is already RGB and size x size is copied unchanged (CIFAR at "
                                                 "--size 32)."),
    quality: int = typer.Option(P.quality, min=1, max=100, help="JPEG quality of the written images."),
    resample: Resample = typer.Option(P.resample, help="Resize filter."),
    seed: int = typer.Option(P.seed, help="Seed of the shuffle of training samples across shards."),
    shard_size: int = typer.Option(P.shard_size, min=1, help="Samples per shard."),
    workers: int = typer.Option(P.workers, min=0, show_default=False, help="Processes converting images, this one "
                                "included (default 0: one per core)."),
    holdout: float = typer.Option(P.holdout, min=0, max=1, help="Hold out this fraction (0 to 1) of each class of train/ as the "
                                                  "val split (for a source without val/, e.g. CIFAR-10's training "
                                                  "folder)."),
    max_pixels: int = typer.Option(P.max_pixels, min=1, help="Reject sources with more pixels than this."),
    exact_stats: bool = typer.Option(P.exact_stats, "--exact-stats", help="Compute the mean image and RGB PCA over "
                                     "the JPEGs as written (decodes every image a second time) rather than over "
                                     "the pixels just before encoding; the difference is far below what mean "
                                     "subtraction and the PCA colour noise can tell (docs/design.md)."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any file has to be rejected."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different data set in --out."),
    as_json: bool = json_option(),
) -> None:
    """Resize images to SIZE x SIZE, compute the mean image and RGB PCA, write WebDataset shards.

    Each image is rescaled so its shorter side is --size and the central square is kept
    (the paper's section 2). Files that cannot be used are listed in rejected.json with the
    reason. Interrupted, the same command continues where it stopped.

    Examples:
      alexcli prepare /data/imagenet --out shards/imagenet --workers 16
      alexcli prepare cifar-10-python.tar.gz --size 32 --holdout 0.1 --out shards/cifar10
    """
    from alexcli.data.prepare import default_out, prepare

    out_dir = out_dir or default_out(src)
    cfg = P(size=size, quality=quality, resample=resample, max_pixels=max_pixels, seed=seed, shard_size=shard_size,
            workers=workers, holdout=holdout, strict=strict, overwrite=overwrite, exact_stats=exact_stats)
    with Reporter() as report:
        summary = prepare(src, out_dir, cfg, progress=report)
    if as_json:
        emit_json(summary)
    else:
        render_summary(summary)


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)
