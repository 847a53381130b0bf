"""`alexcli eval --confusion PNG`: the confusion matrix of a scored split as a picture.

Rows are the true classes and columns the top-1 predictions, each row divided by its class's image
count (so a row sums to 1 and the diagonal is the per-class top-1 accuracy); the colour scale is
square-root, so the rare confusions off the diagonal stay visible beside a diagonal near 1. Up to
LABELLED classes every row and column is named; beyond that (ImageNet's 1,000) the axes show class
indices and the picture is what to look at: blocks of related classes (dogs, birds) near the
diagonal.
"""

from __future__ import annotations

from pathlib import Path

from alexcli.figures.plot import pyplot, save_figure, short

LABELLED = 40  # classes up to which every row and column is named


def confusion_figure(confusion: list[list[int]], names: list[str], title: str):
    import numpy as np

    plt = pyplot()
    from matplotlib.colors import PowerNorm

    c = np.asarray(confusion, dtype=np.float64)
    n = c.shape[0]
    rows = c.sum(1, keepdims=True)
    frac = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    side = min(14.0, max(7.0, 0.28 * n + 2.5)) if n <= LABELLED else 12.0  # inches at 100 dpi
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(frac, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's images")
    if n <= LABELLED:
        labels = [short(s, 24) for s in names]
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
        if n <= 12:  # few classes: the counts themselves
            for i in range(n):
                for j in range(n):
                    if c[i, j]:
                        ax.text(j, i, f"{int(c[i, j])}", ha="center", va="center", fontsize=8,
                                color="black" if frac[i, j] > 0.5 else "white")
    index = "" if n <= LABELLED else " index"
    ax.set(xlabel=f"predicted class{index} (top-1)", ylabel=f"true class{index}")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_confusion(confusion: list[list[int]], names: list[str], title: str, out) -> Path:
    return save_figure(confusion_figure(confusion, names, title), Path(out))
