"""Which initialisation leaves chance: the runs behind docs/results.md's initialisation tables.

`run` trains one network per configuration (`--init` preset and `--input-scale`) with
`alexcli train`, everything else the same, and skips a configuration whose run is complete;
`report` reads their metrics.jsonl and prints the markdown table (per configuration: the step at
which the training loss first fell below 0.95 ln(classes), the training loss and val top-1 error
at the first, middle and last epoch, the best val top-1) and draws every epoch's in the curves.

  # full width on 128-px CIFAR-10 with 112 crops (docs/results.md)
  .venv/bin/python scripts/init_study.py run --data shards/c10-128 --out runs/init-study -- --crop 112 --epochs 10
  .venv/bin/python scripts/init_study.py report runs/init-study --png docs/init-study-cifar10.png
  # the demo's size: a quarter width on 64 crops
  .venv/bin/python scripts/init_study.py run --data shards/demo --out runs/init-demo \\
      -- --width 0.25 --crop 64 --batch 32 --epochs 30 --lr-steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

# (preset, input scale), in the order they are run and reported
CONFIGS = (("convnet2", 255), ("paper", 255), ("kaiming", 1), ("paper", 1), ("caffe", 255), ("caffe", 1),
           ("convnet2", 1))
# The same for every configuration unless the extra arguments say otherwise: the paper's SGD at a
# constant lr (the question is whether a run starts to learn, not where a schedule takes it).
COMMON = ("--schedule", "steps", "--lr-steps", "1000", "--keep", "0", "--save-every", "0")


def name(preset: str, scale: float) -> str:
    return f"{preset}-x{scale:g}"


def run(args) -> int:
    for preset, scale in CONFIGS:
        out = Path(args.out) / name(preset, scale)
        if (out / "metrics.jsonl").is_file() and list(out.glob("ckpt-e*.safetensors")) and not args.again:
            print(f"{out}: done, skipped")
            continue
        cmd = [sys.executable, "-m", "alexcli", "train", "--data", args.data, "--out", str(out), "--overwrite",
               "--init", preset, "--input-scale", str(scale), *COMMON, *args.extra]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            print(f"{out}: failed", flush=True)
    return 0


def load(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def report(args) -> int:
    root = Path(args.runs)
    runs = {name(p, s): load(root / name(p, s)) for p, s in CONFIGS if (root / name(p, s) / "metrics.jsonl").is_file()}
    if not runs:
        print(f"{root}: no runs", file=sys.stderr)
        return 1
    last = max(len(rows) for rows in runs.values())
    shown = sorted({1, (last + 1) // 2, last})  # first, middle and last epoch; the curves have them all
    print("| `--init` | input scale | left chance at step | " + " | ".join(f"loss e{e}" for e in shown) + " | "
          + " | ".join(f"val top-1 e{e}" for e in shown) + " | best val top-1 |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in range(2 * len(shown))) + " | ---: |")
    for key, rows in runs.items():
        preset, scale = key.rsplit("-x", 1)
        by_epoch = {m["epoch"]: m for m in rows}
        left = next((m["left_chance_step"] for m in reversed(rows) if m.get("left_chance_step") is not None), None)
        loss = [f"{by_epoch[e]['train_loss']:.3f}" if e in by_epoch else "" for e in shown]
        err = [f"{by_epoch[e]['val_top1_error']:.1%}" if e in by_epoch else "" for e in shown]
        best = min(m["val_top1_error"] for m in rows)
        print(f"| `{preset}` | {scale} | {left if left is not None else 'not in ' + format(rows[-1]['step'], ',')} | "
              + " | ".join(loss + err) + f" | {best:.1%} |")
    if args.png:
        draw(runs, Path(args.png), args.classes)
    return 0


def draw(runs: dict, png: Path, classes: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from alexcli.figures.plot import pyplot, save_figure

    plt = pyplot()
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {preset: f"C{i}" for i, preset in enumerate(dict.fromkeys(p for p, _ in CONFIGS))}
    for key, rows in runs.items():
        preset, scale = key.rsplit("-x", 1)
        style = dict(marker="o", ms=3, label=key, color=colours[preset], ls="-" if scale == "255" else "--")
        epochs = [m["epoch"] for m in rows]
        loss_ax.plot(epochs, [m["train_loss"] for m in rows], **style)
        err_ax.plot(epochs, [100 * m["val_top1_error"] for m in rows], **style)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss (mean over the epoch)")
    err_ax.set(xlabel="epoch", ylabel="val top-1 error (%)", title="validation top-1 error")
    loss_ax.axhline(math.log(classes), color="grey", lw=0.8, ls="--", label=f"ln {classes} (chance)")
    loss_ax.legend(fontsize=8)
    loss_ax.set_ylim(top=min(loss_ax.get_ylim()[1], 4.0))
    err_ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)
    print(f"wrote {png}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="train every configuration")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--again", action="store_true", help="rerun configurations that are done")
    r.add_argument("extra", nargs="*", help="after --: more alexcli train options, the same for every run")
    p = sub.add_parser("report", help="the table and the curves")
    p.add_argument("runs")
    p.add_argument("--png", help="draw the curves here")
    p.add_argument("--classes", type=int, default=10, help="the data set's classes (the chance line)")
    args = parser.parse_args(argv)
    return run(args) if args.what == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
