"""`alexcli import` (torchvision's and Caffe's AlexNets as alexcli checkpoints) and `alexcli export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alexcli.choices import ExportFormat, ImportKind
from alexcli.cli._ui import checkpoints, ckpt_argument, emit_json, json_option, last_option, out


def _classes(imp, classes: Optional[Path], data: Optional[str]) -> tuple[list[str], list[str], str]:
    """(ids, names, where they came from) for the imported network's outputs."""
    from alexcli.convert.common import classes_of_data, read_classes
    from alexcli.convert.torchvision import torchvision_names
    from alexcli.errors import UsageError

    n = imp.arch.num_classes
    if classes is not None and data is not None:
        raise UsageError("--classes and --data both give the class list: give one")
    if classes is not None:
        ids, names = read_classes(classes, n)
        return ids, names, f"--classes {classes}"
    if data is not None:
        ids, names = classes_of_data(data, n)
        return ids, names, f"the data set {data}"
    names = torchvision_names(n)
    if names is not None:  # ImageNet's 1,000 in wnid order, as torchvision and Caffe's synsets.txt list them
        return names, names, "torchvision's ImageNet category names (also the ids)"
    ids = [str(i) for i in range(n)]
    return ids, ids, "output indices (no --classes or --data given)"


def import_command(
    kind: ImportKind = typer.Argument(..., help="Whose file: torchvision (an alexnet state dict, .pth or "
                                                ".safetensors) or caffe (a .caffemodel)."),
    file: Path = typer.Argument(..., help="The pretrained weights."),
    dest: Path = typer.Option(..., "--out", help="The alexcli checkpoint to write (.safetensors)."),
    mean: Optional[Path] = typer.Option(None, "--mean", help="caffe: the mean image it was trained with "
                                                             "(.binaryproto or .npy)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="A class list in output order, one per line: "
                                                                   "`ID NAME` (LOC_synset_mapping.txt, "
                                                                   "synset_words.txt) or an ID alone."),
    data: Optional[str] = typer.Option(None, "--data", help="Take the class list from this prepared data set "
                                                            "(its classes must be the network's, in order)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is an alexcli checkpoint."),
    as_json: bool = json_option(),
) -> None:
    """Turn a pretrained AlexNet from torchvision or Caffe into an alexcli checkpoint.

    The checkpoint is an ordinary one: eval, ensemble, predict, kernels, neighbors and train --init
    read it like any other. torchvision's alexnet is the "one weird trick" network, registered as
    architecture owt; Caffe's bvlc_alexnet is the paper's grouped network at 227 with Caffe's LRN
    (norm lrn-caffe). Prints every tensor it mapped; a file of another network is refused. Without
    --classes or --data a 1,000-class network takes torchvision's ImageNet names as its classes:
    to score it on a prepared ImageNet give --data shards/imagenet (docs/weights.md says where the
    files come from and what their publishers report).

    Examples:
      alexcli import torchvision alexnet-owt-7be5be79.pth --data shards/imagenet --out runs/imported/torchvision.safetensors
      alexcli import caffe bvlc_alexnet.caffemodel --mean ilsvrc_2012_mean.npy --data shards/imagenet --out runs/imported/caffe.safetensors
    """
    from alexcli.convert.common import check_out, save_imported
    from alexcli.errors import UsageError

    dest = check_out(dest, overwrite)
    if kind == ImportKind.torchvision:
        if mean is not None:
            raise UsageError("--mean is for caffe: torchvision's normalisation is fixed (docs/weights.md)")
        from alexcli.convert.torchvision import read_torchvision

        imp = read_torchvision(file)
    else:
        from alexcli.convert.caffe import read_caffe

        imp = read_caffe(file, mean)
    ids, names, source = _classes(imp, classes, data)
    summary = dict(save_imported(imp, dest, ids, names), class_list=source)
    if as_json:
        emit_json(summary)
        return
    from rich.table import Table

    from alexcli.model.registry import describe

    table = Table(title=f"{file} ({kind.value}) -> {dest}", title_justify="left")
    for col in ("from", "to", "shape"):
        table.add_column(col)
    for m in imp.mapping:
        table.add_row(m["from"], m["to"], "x".join(map(str, m["shape"])))
    out.print(table)
    for note in imp.notes:
        out.print(f"- {note}", soft_wrap=True)
    out.print(f"wrote {dest}: {describe(imp.arch)}, {summary['parameters']:,} parameters; classes from {source}",
              soft_wrap=True)
    r = imp.reported
    if r:
        out.print(f"its publisher reports top-1 {r['top1']}% / top-5 {r['top5']}% accuracy ({r['source']}), i.e. "
                  f"top-1 error {100 - r['top1']:.2f}% / top-5 error {100 - r['top5']:.2f}%: check with "
                  f"alexcli eval {dest} --data shards/imagenet", soft_wrap=True)


def export_command(
    ckpt: Path = ckpt_argument(),
    fmt: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="What to write."),
    dest: Path = typer.Option(..., "--out", help="The file to write (.onnx)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is an ONNX model."),
    last: bool = last_option(),
    as_json: bool = json_option(),
) -> None:
    """Export a checkpoint as an ONNX model, checked with onnxruntime against alexcli's own forward pass.

    The graph takes images as alexcli prepare writes them: float32 (N, 3, S, S), RGB, 0..1, S the
    checkpoint's image size; it crops the central patch, subtracts the mean image and returns the
    logits, as eval --crops center does. The batch is dynamic; class ids and names are in the
    model's metadata. Needs the onnx and onnxruntime packages (pip install 'alexcli[onnx]'). A
    network with a layer ONNX cannot express is refused naming that layer, and nothing is written.

    Example: alexcli export runs/demo/seed0 --out runs/demo/seed0.onnx
    """
    from alexcli.convert.onnx import export_checkpoint

    [ckpt] = checkpoints([ckpt], last)
    result = export_checkpoint(ckpt, dest, overwrite=overwrite)
    if as_json:
        emit_json(result)
        return
    c = result["checked"]
    out.print(f"wrote {result['out']} ({fmt.value}, opset {result['opset']}, {result['bytes']:,} bytes): input "
              f"image float32 (batch, 3, {result['image_size']}, {result['image_size']}) 0..1 RGB, output logits "
              f"(batch, {result['classes']}); {c['runtime']} agrees with alexcli on {c['images']} images to "
              f"{c['max_difference']:.1e} of the logits' scale", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
    app.command("export")(export_command)
