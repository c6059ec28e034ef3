"""PNG figures for people who would rather look than read: the loss curve."""

from __future__ import annotations

import io
from pathlib import Path

from ftpipe.io import write_bytes


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path, *,
                ylabel: str = "cross-entropy (response tokens)") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes(path, png.getvalue())  # atomic, and put in place with the stage's other outputs
