"""The sparsity–fidelity frontier of a sweep: one table, three plots and ``report.md``.

Reads the ``resae eval`` report of every run of a :mod:`resae_serve.sweep` (evaluated
together, so every number is on the same tokens) and sets ReSAE against layerwise SAEs at each
k: reconstruction per layer, joint ΔCE in each splicing mode against L0, and the ratio
ReSAE / layerwise of joint ΔCE, the quantity the method's claim is about ("roughly halves").
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from resae_serve import __version__
from resae_serve.evaluation.plots import pyplot, save_figure
from resae_serve.evaluation.render import fmt, md_table

FRONTIER_JSON, FRONTIER_MD = "frontier.json", "report.md"
DISCUSSION_MD = "discussion.md"
"""Hand-written conclusions kept in the report folder and included in ``report.md``."""

RISING = 0.002
"""Late FVE gain above which a run counts as still improving."""

HALVED = 0.5
"""Ratio ReSAE / layerwise of joint ΔCE at or below which the claim "halves ΔCE" holds."""

_MODE_LABELS = {"teacher_forced": "teacher-forced", "teacher_forced_additive":
                "teacher-forced additive", "online": "online"}


LATE = 0.1
"""Fraction of training whose batch FVE is compared with the fraction before it: a positive
gain means the run was still improving when it stopped."""


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "training_history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def late_gain(history: list[dict[str, Any]], layer: int) -> float | None:
    """Mean batch FVE (SAE input) over the last :data:`LATE` of the records minus the mean over
    the :data:`LATE` before them; None with too few records."""
    values = [row[f"fve/{layer}"] for row in history if f"fve/{layer}" in row]
    n = int(len(values) * LATE)
    if n < 2:
        return None
    return sum(values[-n:]) / n - sum(values[-2 * n:-n]) / n


def _run(name: str, entry: dict[str, Any], wall: dict[str, float]) -> dict[str, Any]:
    splicing = entry["splicing"]
    history = _history(Path(entry["folder"]))
    layers = []
    for row in entry["reconstruction"]:
        key = str(row["layer"])
        single, local = splicing["single"][key], splicing.get("local", {}).get(key)
        layers.append({
            "layer": row["layer"], "fve": row["fve"], "local_fve": row.get("local_fve"),
            "residual_fve": row["residual_fve"], "l0": row["l0"],
            "dead_fraction": row["dead_fraction"], "dense_fraction": row["dense_fraction"],
            "single_delta_ce": single["delta_ce"], "single_kl": single["kl"],
            "local_delta_ce": None if local is None else local["delta_ce"],
            "late_fve_gain": late_gain(history, row["layer"]),
        })
    joint = {mode: {"delta_ce": r["delta_ce"], "kl": r["kl"], "ce_recovered": r["ce_recovered"],
                    "interaction": splicing["interaction"][mode]}
             for mode, r in splicing["joint"].items()}
    return {
        "name": name, "mode": entry["mode"], "k": entry["k"], "d_sae": entry["d_sae"][0],
        "tokens_trained": entry["tokens_trained"], "train_wall_s": wall.get(name),
        "l0": sum(row["l0"] for row in layers) / len(layers),
        "fve": sum(row["fve"] for row in layers) / len(layers),
        "layers": layers, "ce_clean": splicing["ce_clean"], "folder": entry["folder"],
        "sum_single_delta_ce": splicing["sum_single_delta_ce"], "joint": joint,
    }


def frontier_table(report: dict[str, Any], wall: dict[str, float]) -> dict[str, Any]:
    """The frontier of an evaluation report of sweep runs (``frontier.json``).

    ``wall``: training wall time in seconds by run name (missing: not recorded).
    """
    runs = sorted((_run(name, entry, wall) for name, entry in report["dictionaries"].items()),
                  key=lambda r: (r["k"], r["mode"] != "resae"))
    by_k: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_k.setdefault(run["k"], {})[run["mode"]] = run
    ratios = []
    for k, pair in sorted(by_k.items()):
        if {"resae", "layerwise"} <= pair.keys():
            resae, layerwise = pair["resae"]["joint"], pair["layerwise"]["joint"]
            ratios.append({"k": k, **{
                mode: resae[mode]["delta_ce"] / layerwise[mode]["delta_ce"]
                if layerwise[mode]["delta_ce"] > 0 else None
                for mode in resae if mode in layerwise}})
    return {
        "format": "resae-frontier", "package_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": report["model"], "corpus": report["corpus"], "settings": report["settings"],
        "splice_tokens": report["splice_tokens"], "eval_wall_s": report.get("eval_wall_s"),
        "runs": runs, "ratios": ratios,
    }


def _ks(items: list[int]) -> str:
    return "k = " + ", ".join(map(str, items)) if items else "no k"


def findings(table: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers: where ReSAE's joint ΔCE is lower, where it is
    halved, and where its FVE is below layerwise."""
    lines = []
    modes = [m for m in _MODE_LABELS if any(m in r for r in table["ratios"])]
    for mode in modes:
        rows = [r for r in table["ratios"] if r.get(mode) is not None]
        if not rows:
            lines.append(f"- Joint ΔCE, {_MODE_LABELS[mode]}: no k where the layerwise "
                         "dictionary's ΔCE is positive, so no ratio.")
            continue
        lower = [r["k"] for r in rows if r[mode] < 1]
        halved = [r["k"] for r in rows if r[mode] <= HALVED]
        spread = ", ".join(f"{r[mode]:.2f} (k {r['k']})" for r in rows)
        lines.append(f"- Joint ΔCE, {_MODE_LABELS[mode]}: ReSAE / layerwise = {spread}. "
                     f"ReSAE lower at {_ks(lower)}; halved (≤ {HALVED}) at {_ks(halved)}.")
    pairs: dict[int, dict[str, dict[str, Any]]] = {}
    for run in table["runs"]:
        pairs.setdefault(run["k"], {})[run["mode"]] = run
    below = []
    for k, pair in sorted(pairs.items()):
        if {"resae", "layerwise"} <= pair.keys():
            worse = [r["layer"] for r, w in zip(pair["resae"]["layers"],
                                                 pair["layerwise"]["layers"], strict=True)
                     if r["fve"] < w["fve"] - 1e-4]
            below.append(f"k {k}: layers {worse}" if worse else f"k {k}: none")
    if below:
        lines.append("- Layers where ReSAE's activation-space FVE is below layerwise: "
                     + "; ".join(below) + ".")
    rising = [f"{run['name']} (layer {row['layer']}: +{row['late_fve_gain']:.3f})"
              for run in table["runs"] for row in run["layers"]
              if row["late_fve_gain"] is not None and row["late_fve_gain"] > RISING]
    lines.append(f"- Still improving at the end of training (batch FVE of the last "
                 f"{LATE:.0%} of steps above the {LATE:.0%} before by more than {RISING}): "
                 + (", ".join(rising) if rising else "none") + ".")
    return lines


def render_frontier(table: dict[str, Any], plots: list[str], discussion: str | None) -> str:
    """``report.md`` of the frontier."""
    settings, runs = table["settings"], table["runs"]
    first: dict[str, Any] = runs[0] if runs else {"layers": [], "d_sae": "?",
                                                  "tokens_trained": "?"}
    layer_ids = [row["layer"] for row in first["layers"]]
    lines = [
        "# Sparsity–fidelity frontier: ReSAE vs layerwise SAEs", "",
        f"Model `{table['model']}`, corpus `{table['corpus']}`; layers {layer_ids}, "
        f"{first['d_sae']} latents per layer, {first['tokens_trained']} training tokens per run "
        f"(one capture shared by every run, same seed). Reconstruction on held-out activations; "
        f"splicing on {settings['splice_windows']} held-out windows of "
        f"{settings['context_size']} tokens ({table['splice_tokens']} spliced positions), the "
        f"same for every run. resae-serve {table['package_version']}, {table['created']}.", "",
    ]
    if discussion:
        lines += ["## Discussion", "", discussion.strip(), ""]
    lines += ["## Findings (computed)", "", *findings(table), "",
              "## Joint replacement", "",
              "ΔCE = CE_spliced − CE_clean (nats/token), KL(p_clean ‖ p_spliced) per token, "
              "interaction = ΔCE_joint − Σ ΔCE_single, CE recovered against mean ablation of "
              "all layers. Teacher-forced: every layer replaced by its reconstruction from the "
              "clean pass (equals the last layer alone); teacher-forced additive: encoders read "
              "the clean pass and every layer adds its own error to the stream; online: "
              "encoders read the spliced stream.", ""]
    modes = [m for m in _MODE_LABELS if runs and m in runs[0]["joint"]]
    rows = []
    for run in runs:
        cells = [str(run["k"]), run["mode"], fmt(run["l0"], ".1f"), fmt(run["fve"])]
        for mode in modes:
            j = run["joint"][mode]
            cells += [fmt(j["delta_ce"]), fmt(j["kl"])]
        online = run["joint"].get("online")
        cells += [fmt(run["sum_single_delta_ce"]),
                  fmt(None if online is None else online["interaction"]),
                  fmt(None if online is None else online["ce_recovered"], ".3f"),
                  fmt(run["train_wall_s"], ".0f")]
        rows.append(cells)
    header = ["k", "mode", "L0", "mean FVE"]
    for mode in modes:
        header += [f"ΔCE {_MODE_LABELS[mode]}", f"KL {_MODE_LABELS[mode]}"]
    header += ["Σ ΔCE single", "interaction online", "CE recovered online", "train s"]
    lines += md_table(header, rows)
    lines += ["Ratio ReSAE / layerwise of joint ΔCE (below 1: ReSAE better; ≤ 0.5: halved).", ""]
    lines += md_table(["k", *(_MODE_LABELS[m] for m in modes)],
                    [[str(r["k"]), *(fmt(r.get(m), ".3f") for m in modes)]
                     for r in table["ratios"]])
    lines += ["## Per layer", "",
              "FVE in activation space (a ReSAE's through the chain); local FVE: a ReSAE layer "
              "rebuilt from the clean previous layer (A h_prev + c + σ D(z)); residual FVE in "
              "r = h − A h_prev − c (a layerwise run uses the ReSAE's maps of the same report). "
              "ΔCE single: that layer alone replaced; local: by its local reconstruction. Late "
              f"FVE gain: batch FVE (SAE input) of the last {LATE:.0%} of training minus the "
              f"{LATE:.0%} before (positive: still improving).", ""]
    rows = [[str(run["k"]), run["mode"], str(row["layer"]), fmt(row["fve"]),
             fmt(row["local_fve"]), fmt(row["residual_fve"]), fmt(row["l0"], ".1f"),
             fmt(row["dead_fraction"], ".1%"), fmt(row["dense_fraction"], ".1%"),
             fmt(row["single_delta_ce"]), fmt(row["local_delta_ce"]),
             fmt(row["late_fve_gain"], "+.4f")]
            for run in runs for row in run["layers"]]
    lines += md_table(["k", "mode", "layer", "FVE", "local FVE", "residual FVE", "L0", "dead",
                     "dense", "ΔCE single", "ΔCE local", "late FVE gain"], rows)
    if table.get("eval_wall_s") is not None:
        lines += [f"Evaluation of all runs: {table['eval_wall_s']:.0f} s.", ""]
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(lines)


def _pairs(table: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in table["runs"]:
        out.setdefault(run["mode"], []).append(run)
    return {mode: sorted(runs, key=lambda r: r["l0"]) for mode, runs in out.items()}


def plot_joint_delta_ce(table: dict[str, Any], path: Path) -> Path:
    """Joint ΔCE against L0, one panel per splicing mode, both dictionary modes per panel."""
    plt = pyplot()
    by_mode = _pairs(table)
    modes = [m for m in _MODE_LABELS if table["runs"] and m in table["runs"][0]["joint"]]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.8), squeeze=False)
    for ax, splice in zip(axes[0], modes, strict=True):
        for mode, runs in by_mode.items():
            ax.plot([r["l0"] for r in runs], [r["joint"][splice]["delta_ce"] for r in runs],
                    marker="o", label=mode)
            for r in runs:
                ax.annotate(f"k{r['k']}", (r["l0"], r["joint"][splice]["delta_ce"]),
                            fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log", base=2)
        ax.set(xlabel="L0 (active latents per token)", ylabel="joint ΔCE (nats / token)",
               title=f"joint, {_MODE_LABELS[splice]}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_fve_l0(table: dict[str, Any], path: Path) -> Path:
    """FVE against L0 per layer: activation space for both modes, ReSAE's local FVE dashed."""
    plt = pyplot()
    by_mode = _pairs(table)
    layers = [row["layer"] for row in table["runs"][0]["layers"]]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.6), squeeze=False)
    for i, (ax, layer) in enumerate(zip(axes[0], layers, strict=True)):
        for mode, runs in by_mode.items():
            l0 = [r["l0"] for r in runs]
            line, = ax.plot(l0, [r["layers"][i]["fve"] for r in runs], marker="o", label=mode)
            local = [r["layers"][i]["local_fve"] for r in runs]
            if all(v is not None for v in local):
                ax.plot(l0, local, marker="x", linestyle="--", color=line.get_color(),
                        label=f"{mode}, local")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="L0", ylabel="FVE (held-out)", title=f"layer {layer}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_ratio(table: dict[str, Any], path: Path) -> Path:
    """ReSAE / layerwise joint ΔCE against k, one line per splicing mode; 1 and 0.5 marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ks = [r["k"] for r in table["ratios"]]
    for mode, label in _MODE_LABELS.items():
        values = [r.get(mode) for r in table["ratios"]]
        if values and all(v is not None for v in values):
            ax.plot(ks, values, marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.axhline(HALVED, color="grey", linestyle=":", linewidth=1, label="halved")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k", ylabel="joint ΔCE, ReSAE / layerwise", title="ReSAE relative to layerwise")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_training(table: dict[str, Any], path: Path, window: int = 10) -> Path | None:
    """Batch FVE (SAE input) against training tokens per layer, every run (moving average of
    ``window`` records); None when no run has a history."""
    histories = {run["name"]: (run, _history(Path(run["folder"]))) for run in table["runs"]}
    if not any(h for _, h in histories.values()):
        return None
    plt = pyplot()
    layers = [row["layer"] for row in table["runs"][0]["layers"]]
    ks = sorted({run["k"] for run in table["runs"]})
    colors = plt.get_cmap("viridis")([i / max(len(ks) - 1, 1) for i in range(len(ks))])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for name, (run, history) in histories.items():
            values = [row[f"fve/{layer}"] for row in history]
            if not values:
                continue
            smooth = [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                      for i in range(len(values))]
            ax.plot([row["tokens"] for row in history], smooth, linewidth=1,
                    color=colors[ks.index(run["k"])],
                    linestyle="-" if run["mode"] == "resae" else "--", label=name)
        ax.set(xlabel="training tokens", ylabel="batch FVE (SAE input)", title=f"layer {layer}")
        ax.set_ylim(bottom=0, top=1)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=6)
    return save_figure(fig, path)


def write_frontier(out: Path, table: dict[str, Any]) -> list[Path]:
    """Write ``frontier.json``, the plots and ``report.md`` (with ``discussion.md`` if the
    folder holds one) into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / FRONTIER_JSON).write_text(json.dumps(table, indent=2) + "\n")
    plots = [plot_joint_delta_ce(table, out / "joint_delta_ce_l0.png"),
             plot_fve_l0(table, out / "fve_l0.png")]
    if table["ratios"]:
        plots.append(plot_ratio(table, out / "ratio_k.png"))
    training = plot_training(table, out / "training_fve.png")
    if training is not None:
        plots.append(training)
    discussion_path = out / DISCUSSION_MD
    discussion = discussion_path.read_text() if discussion_path.is_file() else None
    (out / FRONTIER_MD).write_text(render_frontier(table, [p.name for p in plots], discussion))
    return [out / FRONTIER_JSON, out / FRONTIER_MD, *plots]
