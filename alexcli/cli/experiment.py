from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alexcli.choices import Device, Experiment, comma_list
from alexcli.cli._ui import Reporter, device_option, emit_json, json_option, no_verify_option, out
from alexcli.experiment.plans import ExperimentConfig as C


def _fmt(s: dict, pct: bool = False, unit: str = "") -> str:
    if s["mean"] is None:
        return "not reached"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.2f}{unit}")
    text = f(s["mean"])
    if s["n"] > 1:
        text += f" ± {f(s['std'])} (n={s['n']})"
    return text


def render(r: dict) -> None:
    cfg = r["config"]
    out.print(f"{r['experiment']} on {r['train_images']:,} training images, {cfg['epochs']} epochs, "
              f"{cfg['seeds']} seed(s), {r['device']}; learning rates "
              + ", ".join(f"{k} {v:g}" for k, v in r["learning_rates"].items()))
    if r["experiment"] == "relu-vs-tanh":
        t, epochs, seeds = r["target_error"], cfg["epochs"], cfg["seeds"]
        for label, reach in r["reach"].items():
            missed = r["not_reached"][label]
            if reach["epochs"]["mean"] is None:
                out.print(f"  {label}: did not reach {t:.0%} training error in {epochs} epochs"
                          + (f" (none of {seeds} seeds)" if seeds > 1 else ""))
                continue
            out.print(f"  {label}: {t:.0%} training error after {_fmt(reach['epochs'])} epochs, "
                      f"{_fmt(reach['seconds'], unit=' s')}"
                      + (f"; {missed} of {seeds} seeds did not reach it in {epochs} epochs" if missed else ""))
        if r["ratio_epochs"]["mean"] is None:
            out.print(f"  tanh / relu: no ratio, since no seed had both reach {t:.0%} in {epochs} epochs "
                      f"(paper: about {r['paper_ratio']:g}x); try more --epochs")
        else:
            out.print(f"  tanh / relu: {_fmt(r['ratio_epochs'])}x the epochs, {_fmt(r['ratio_seconds'])}x the time "
                      f"(paper: about {r['paper_ratio']:g}x)")
    else:
        for label, s in r["test"].items():
            out.print(f"  {label}: test error {_fmt(s['test_error'], pct=True)} centre patch, "
                      f"{_fmt(s['test_error_ten'], pct=True)} ten patches")
        out.print(f"  without - with normalisation: {_fmt(r['difference'], pct=True)} (paper: 13% - 11% = 2%)")
    out.print(f"figure: {r['figure']}; results: {Path(r['figure']).parent / 'results.json'}; "
              f"{r['seconds'] / 60:.1f} min")


def experiment_command(
    name: Experiment = typer.Argument(..., metavar="NAME", help="relu-vs-tanh (Figure 1) or lrn (section 3.3: "
                                                                "13% vs 11%)."),
    data: str = typer.Option(..., "--data", help="A prepared CIFAR-10 (alexcli prepare SRC --size 32 --holdout "
                                                   "0.1): a folder or a URL of one (https://, s3://, pipe:CMD; "
                                                   "docs/cluster.md)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: runs/experiments/NAME)."),
    epochs: int = typer.Option(C.epochs, min=1, help="Epochs of each final run."),
    seeds: int = typer.Option(C.seeds, min=1, help="Seeds per variant (0..N-1): mean and spread are reported."),
    subset: int = typer.Option(C.subset, min=0, help="Training images to use (0: all): the first of the shuffled "
                                                     "shards."),
    lrs: str = typer.Option(",".join(f"{lr:g}" for lr in C.lrs), help="Learning rates of the sweep that picks "
                                                                      "each variant's own; one rate, or one per "
                                                                      "variant (relu=0.003,tanh=0.01), skips the "
                                                                      "sweep."),
    sweep_epochs: int = typer.Option(C.sweep_epochs, min=1, help="Epochs of each sweep run."),
    batch: int = typer.Option(C.batch, min=1, help="Images per SGD step."),
    weight_decay: float = typer.Option(C.weight_decay, min=0.0, help="lrn: weight decay on local3, local4 and fc10 "
                                                                     "(cuda-convnet's wc); relu-vs-tanh uses none, "
                                                                     "as Figure 1."),
    crop: int = typer.Option(C.crop, min=0, help="Input side (0: 32, whole images, for relu-vs-tanh; 24, random "
                                                 "crops, for lrn)."),
    norm: str = typer.Option(C.norm, help="lrn: the normalisation compared with none (lrn, lrn-convnet or a "
                                          "plugin's)."),
    target: float = typer.Option(C.target, min=0.0, max=1.0, help="relu-vs-tanh: the training error to reach, in (0, 1) (Figure 1: "
                                                "25%)."),
    width: float = typer.Option(C.width, min=0.0, max=4.0, help="Channel multiplier of the net, in (0, 4]."),
    device: Device = device_option(),
    no_verify: bool = no_verify_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of another experiment (or "
                                                              "other settings, or data) in --out."),
    as_json: bool = json_option(),
) -> None:
    """Rerun one of the paper's CIFAR-10 experiments with the four-layer net (--arch cifar-local).

    The data set is decoded once into memory. Every run is saved in OUT/fits/ when it ends, so
    the same command run again after an interruption continues with the runs not yet done.
    Writes OUT/results.json, the figure, and the final weights (OUT/VARIANT-seedN.safetensors).

    Examples:
      alexcli prepare cifar10 --size 32 --holdout 0.1 --out shards/cifar10
      alexcli experiment relu-vs-tanh --data shards/cifar10 --epochs 30 --seeds 3
      alexcli experiment relu-vs-tanh --data shards/cifar10 --lrs relu=0.003,tanh=0.01 --seeds 3
      alexcli experiment lrn --data shards/cifar10 --epochs 60 --lrs 0.001 --json
    """
    from alexcli import plugins
    from alexcli.errors import UsageError
    from alexcli.experiment.run import run_experiment

    rates, fixed = (), {}
    lrs_like = "learning rates like 0.001,0.01 or relu=0.003,tanh=0.01"
    try:
        items = comma_list(lrs, "--lrs", lrs_like)
        if "=" in lrs:  # one rate per variant, e.g. relu=0.003,tanh=0.01
            fixed = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in items)}
        else:
            rates = tuple(float(v) for v in items)
    except ValueError:
        raise UsageError(f"--lrs {lrs!r}: expected {lrs_like}") from None
    plugins.info("norm", norm)  # an unknown name fails before any work
    cfg = C(data=str(data), out=str(out_dir or Path("runs") / "experiments" / name.value), epochs=epochs, seeds=seeds,
            subset=subset, batch=batch, lrs=rates, fixed_lrs=fixed, sweep_epochs=sweep_epochs,
            weight_decay=weight_decay, crop=crop, norm=norm, width=width, device=device, target=target,
            verify=not no_verify)
    with Reporter() as report:
        result = run_experiment(name, cfg, progress=report, overwrite=overwrite)
    if as_json:
        emit_json(result)
    else:
        render(result)


def register(app: typer.Typer) -> None:
    app.command("experiment")(experiment_command)
