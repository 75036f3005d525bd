"""Training curves as a PNG next to the artifact: loss, FVE, L0 and dead fraction per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], layers: tuple[int, ...], path: Path, *,
                 title: str = "") -> Path:
    """Four panels against training tokens, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    tokens = [row["tokens"] for row in history]
    for ax, (key, label) in zip(axes.flat, [("loss", "loss"), ("fve", "FVE (batch, SAE input)"),
                                            ("l0", "L0"), ("dead", "dead fraction")],
                                strict=True):
        for layer in layers:
            ax.plot(tokens, [row[f"{key}/{layer}"] for row in history], label=f"layer {layer}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_yscale("log")
    lowest = min((row[f"fve/{layer}"] for row in history for layer in layers), default=0.0)
    axes[0, 1].set_ylim(bottom=max(0.0, lowest), top=1.0)
    for ax in axes[1]:
        ax.set_xlabel("training tokens")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
