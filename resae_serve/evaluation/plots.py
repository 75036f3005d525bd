"""PNG plots of an evaluation report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resae_serve.evaluation.redundancy import LayerRedundancy


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG and free it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_fve_l0(report: dict[str, Any], path: Path) -> Path:
    """Activation-space (solid) and residual-space (dashed) FVE, and L0, per layer."""
    plt = pyplot()
    fig, (ax_fve, ax_l0) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in report["dictionaries"].items():
        rows = entry["reconstruction"]
        layers = [row["layer"] for row in rows]
        line, = ax_fve.plot(layers, [row["fve"] for row in rows], marker="o",
                            label=f"{name} ({entry['mode']})")
        residual = [(row["layer"], row["residual_fve"]) for row in rows
                    if row["residual_fve"] is not None]
        if residual:
            ax_fve.plot(*zip(*residual, strict=True), marker="x", linestyle="--",
                        color=line.get_color(), label=f"{name}: residual space")
        ax_l0.plot(layers, [row["l0"] for row in rows], marker="o", label=name)
    ax_fve.set(xlabel="layer", ylabel="FVE (held-out)", title="fraction of variance explained")
    ax_l0.set(xlabel="layer", ylabel="L0", title="active latents per token")
    ax_l0.set_ylim(bottom=0, top=1.15 * max(
        (row["l0"] for e in report["dictionaries"].values() for row in e["reconstruction"]),
        default=1.0))
    all_layers = sorted({row["layer"] for e in report["dictionaries"].values()
                         for row in e["reconstruction"]})
    for ax in (ax_fve, ax_l0):
        ax.set_xticks(all_layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_delta_ce(report: dict[str, Any], path: Path) -> Path:
    """ΔCE of each layer alone, their sum, and joint replacement per mode, per dictionary."""
    plt = pyplot()
    names = list(report["dictionaries"])
    fig, ax = plt.subplots(figsize=(max(6, 3 + 2.5 * len(names)), 4))
    width = 0.8 / max(len(names), 1)
    labels: list[str] = []
    for n, name in enumerate(names):
        splicing = report["dictionaries"][name]["splicing"]
        bars = {f"L{layer}": r["delta_ce"] for layer, r in splicing["single"].items()}
        bars["Σ single"] = splicing["sum_single_delta_ce"]
        bars |= {f"joint {mode.replace('_', '-')}": r["delta_ce"]
                 for mode, r in splicing["joint"].items()}
        labels = labels or list(bars)
        xs = [labels.index(k) + (n - (len(names) - 1) / 2) * width for k in bars]
        ax.bar(xs, list(bars.values()), width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set(ylabel="ΔCE (nats / token)", title="splicing: each layer alone vs all jointly")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_redundancy(raw: dict[str, list[LayerRedundancy]], path: Path) -> Path | None:
    """Histograms of max |cos| to the previous layer: one row per layer, raw and mapped."""
    rows = max((len(v) for v in raw.values()), default=0)
    if rows == 0:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(rows, 2, figsize=(10, 2.6 * rows), squeeze=False)
    bins = [i / 50 for i in range(51)]
    for name, layers in raw.items():
        for r, row in enumerate(layers):
            axes[r, 0].hist(row.raw.numpy(), bins=bins, alpha=0.5, label=name)
            if row.mapped is not None:
                axes[r, 1].hist(row.mapped.numpy(), bins=bins, alpha=0.5, label=name)
            axes[r, 0].set_title(f"layer {row.layer} vs {row.previous}: raw", fontsize=9)
            axes[r, 1].set_title(f"layer {row.layer} vs A·(layer {row.previous})", fontsize=9)
    for ax in axes.flat:
        for t in (0.7, 0.9):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("max |cos| to previous layer's decoder rows")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)
