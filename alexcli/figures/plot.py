"""What every picture shares: the PNG rule, matplotlib without a screen, atomic saving; and the
two plots of runs: a training run's curves and an experiment's figure."""

from __future__ import annotations

from pathlib import Path

from alexcli.errors import UsageError
from alexcli.io import atomic_write


def check_png(out, option: str = "--out") -> Path:
    """OUT as a picture's path, or a UsageError naming OPTION: a .png name, not a folder, below folders."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{option} {out}: pictures are written as PNG; give a name ending in .png")
    if out.is_dir():
        raise UsageError(f"{option} {out}: is a directory; give a file name ending in .png")
    above = next((p for p in out.parents if p.exists()), None)  # the folders below it are made
    if above is not None and not above.is_dir():
        raise UsageError(f"{option} {out}: {above} is a file, not a folder")
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, dpi: int = 100) -> Path:
    """FIG as a PNG at OUT (its folder made), atomically; the figure is closed either way."""
    plt = pyplot()
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def save_png(pixels, out: Path) -> Path:
    """An HxWx3 uint8 array as a PNG at OUT, atomically (pixels exact, no resampling)."""
    from PIL import Image

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def percent(p: float) -> str:
    """A probability as the tables and figures show it: one decimal, "<0.1%" below that."""
    return "<0.1%" if p < 0.0005 else f"{p:.1%}"


def integer_epochs(ax) -> None:
    """Whole epochs only on AX's x axis (a few epochs would otherwise get ticks at 0.5, 1.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # 1: one epoch gets one tick, not 0.96..1.05


def curves_figure(rows: list[dict], run: str):
    """The matplotlib figure of a training run's curves, titled with the run's name: loss and
    top-1/top-5 error per epoch (train and val), whole epochs on the x axes."""
    plt = pyplot()
    epochs = [m["epoch"] for m in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [m["train_loss"] for m in rows], marker="o", label="train")
    if rows and rows[0].get("val_loss") is not None:
        a.plot(epochs, [m["val_loss"] for m in rows], marker="o", label="val")
    a.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    a.legend()
    b.plot(epochs, [m["train_top1_error"] for m in rows], marker="o", label="train top-1")
    if rows and rows[0].get("val_top1_error") is not None:
        b.plot(epochs, [m["val_top1_error"] for m in rows], marker="o", label="val top-1")
        b.plot(epochs, [m["val_top5_error"] for m in rows], marker="o", label="val top-5")
    b.set(xlabel="epoch", ylabel="error", title="error", ylim=(0, 1))
    b.legend()
    for ax in (a, b):
        integer_epochs(ax)
    last = f", {len(rows)} epoch{'s' if len(rows) != 1 else ''}" if rows else ""
    fig.suptitle(f"run {run}{last}", fontweight="bold")
    fig.tight_layout()
    return fig


def write_curves(out: Path, rows: list[dict]) -> Path:
    """A training run's curves.png (`curves_figure`), named after the run folder it is written in."""
    return save_figure(curves_figure(rows, Path(out).resolve().parent.name), out)


def target_label(target: float) -> str:
    """The legend entry of Figure 1's target line: the paper's 25%, or the --target given instead."""
    from alexcli.experiment.plans import TARGET_ERROR

    whose = "the paper's target" if abs(target - TARGET_ERROR) < 1e-9 else "--target"
    return f"{target * 100:g}% training error ({whose})"


def experiment_plot(name: str, runs: dict, epochs: int, target: float):
    """The matplotlib figure of an experiment: per variant (solid, then dashed) and seed
    (fainter), the training error (relu-vs-tanh, Figure 1, with the labelled target line) or the
    test error (lrn) per epoch, whole epochs on the x axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = {0: "-", 1: "--"}
    key = "train_error" if name == "relu-vs-tanh" else "test_error"
    for i, (label, rs) in enumerate(runs.items()):
        for k, r in enumerate(rs):
            h = r["history"]
            xs = [0] + [row["epoch"] for row in h if key in row]
            ys = [1 - 1 / r["arch"]["num_classes"]] + [row[key] for row in h if key in row]  # epoch 0: chance
            ax.plot(xs, ys, styles.get(i, ":"), color="black" if i == 0 else "tab:gray",
                    alpha=1.0 if k == 0 else 0.4, label=f"{label} (lr {r['lr']:g})" if k == 0 else None)
    if name == "relu-vs-tanh":
        ax.axhline(target, color="tab:red", lw=0.8, label=target_label(target))
        ax.set(ylabel="training error rate", title="Figure 1: ReLU (solid) vs tanh (dashed)")
    else:
        ax.set(ylabel="test error rate (centre patch)", title=f"{runs and list(runs)[0]} (solid) vs none (dashed)")
    ax.set(xlabel="epochs", ylim=(0, 0.9), xlim=(0, epochs))
    integer_epochs(ax)
    ax.legend()
    fig.tight_layout()
    return fig


def experiment_figure(name: str, runs: dict, epochs: int, target: float, out: Path) -> Path:
    """An experiment's figure (`experiment_plot`) as a PNG at OUT."""
    return save_figure(experiment_plot(name, runs, epochs, target), out, dpi=110)
