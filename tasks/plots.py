"""The run's plots (matplotlib, Agg backend: no display needed). Each function writes one PNG and returns its path.

- `plot_score_trajectory`: validation score vs number of linear layers along the greedy path, with the
  teacher's score and the threshold P_min; committed rounds filled, the rejected last round hollow.
- `plot_distill_losses`: per-layer normalised distillation loss (held-out MSE / Var(teacher output)) before
  and after training; failed layers in red and labelled, with the failure threshold.
- `plot_layer_map`: which layers are full or linear in M_best and M_opt.
- `plot_heal`: the heal's training KL per step, with the held-out KL before and after.
- `plot_score_with_healing`: validation score vs number of linear layers without healing (the greedy path)
  and with it (each healed hybrid, and the rounds of the search that continued from them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def plot_score_trajectory(trajectory: Mapping[str, Any], path: str | Path, metric: str = "score") -> Path:
    """`trajectory` is `GreedyResult.to_dict()`."""
    rounds = trajectory["rounds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [0] + [r["index"] + 1 for r in rounds]
    ys = [trajectory["teacher_score"]] + [r["score"] for r in rounds]
    ax.plot(xs, ys, color="tab:blue", linewidth=1.5, zorder=1)
    for r in rounds:
        ax.scatter(r["index"] + 1, r["score"], s=36, zorder=2, color="tab:blue",
                   facecolors="tab:blue" if r["accepted"] else "white")
        ax.annotate(f"L{r['chosen']}", (r["index"] + 1, r["score"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.scatter([0], [trajectory["teacher_score"]], s=40, color="black", zorder=3, label="teacher")
    ax.axhline(trajectory["p_min"], color="tab:red", linestyle="--", linewidth=1,
               label=f"threshold P_min = {trajectory['p_min']:.3f}")
    ax.scatter([len(trajectory["best_layers"])], [trajectory["best_score"]], marker="*", s=160, color="gold",
               edgecolor="black", zorder=4, label="M_best")
    ax.scatter([len(trajectory["opt_layers"])], [trajectory["opt_score"]], marker="D", s=50, color="tab:green",
               edgecolor="black", zorder=4, label="M_opt")
    ax.set_xlabel("number of linear-attention layers")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("greedy replacement: best candidate per round")
    ax.set_xticks(range(0, max(xs) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_distill_losses(layer_results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """`layer_results` are `LayerResult.to_dict()` values. Failed layers: red bar (if a loss was measured) and a
    red "failed" label; the failure threshold `max_normalized_loss` is drawn when the results carry it."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    results = sorted(layer_results, key=lambda r: r["layer"])
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(results) + 2), 4.0))
    layers = [r["layer"] for r in results]
    failed = [r["status"] != "ok" for r in results]
    initial = [r.get("initial_normalized_loss") or 0.0 for r in results]
    final = [r.get("normalized_loss") or 0.0 for r in results]
    ax.bar([x - 0.2 for x in layers], initial, width=0.4, color="lightgray")
    ax.bar([x + 0.2 for x in layers], final, width=0.4, color=["tab:red" if f else "tab:blue" for f in failed])
    for r, is_failed in zip(results, failed):
        if is_failed:  # at the top of the axes, whatever the loss (a diverged one may be off the scale)
            ax.annotate("failed", (r["layer"] + 0.2, 0.98), xycoords=ax.get_xaxis_transform(), rotation=90,
                        ha="center", va="top", color="tab:red", fontsize=7,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    handles = [Patch(color="lightgray", label="copied weights (before)"),
               Patch(color="tab:blue", label="distilled (after)")]
    if any(failed):
        handles.append(Patch(color="tab:red", label="failed: never offered to the search"))
    thresholds = {r["max_normalized_loss"] for r in results if r.get("max_normalized_loss") is not None}
    handles.append(ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":",
                              label="= predicting the mean" + (" (fails at or above)" if thresholds == {1.0} else "")))
    for threshold in sorted(thresholds - {1.0}):
        handles.append(ax.axhline(threshold, color="tab:red", linewidth=0.8, linestyle="--",
                                  label=f"max_normalized_loss {threshold:g} (fails at or above)"))
    ax.set_yscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are integers: no ticks at -0.5 or 0.5
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised held-out MSE")
    ax.set_title("blockwise local distillation per layer")
    ax.legend(handles=handles, fontsize=8)
    return _save(fig, path)


def plot_layer_map(num_layers: int, maps: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """`maps`: {row name (e.g. "M_best"): linear layer indices}."""
    names = list(maps)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.25 * num_layers + 1.5), 0.6 * len(names) + 1.2))
    for row, name in enumerate(names):
        linear = set(maps[name])
        for layer in range(num_layers):
            ax.add_patch(plt.Rectangle((layer, row), 0.92, 0.8,
                                       color="tab:orange" if layer in linear else "tab:blue"))
    ax.set_xlim(0, num_layers)
    ax.set_ylim(-0.2, len(names))
    ax.set_yticks([i + 0.4 for i in range(len(names))], names)
    ax.set_xticks([i + 0.46 for i in range(num_layers)], [str(i) for i in range(num_layers)], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title("layer map: blue = full attention, orange = linear attention")
    ax.invert_yaxis()
    return _save(fig, path)


def plot_heal(heal: Mapping[str, Any], path: str | Path) -> Path:
    """`heal` is `HealResult.to_dict()` of a finished heal."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    steps = [point[0] for point in heal["loss_curve"]]
    ax.plot(steps, [point[1] for point in heal["loss_curve"]], color="tab:blue", linewidth=1.5,
            label="training KL (its batch)")
    ax.axhline(heal["initial_kl"], color="tab:red", linestyle="--", linewidth=1,
               label=f"held-out KL before: {heal['initial_kl']:.4f}")
    ax.axhline(heal["final_kl"], color="tab:green", linestyle="--", linewidth=1,
               label=f"held-out KL after: {heal['final_kl']:.4f}")
    ax.set_xlabel("heal step")
    ax.set_ylabel("KL(teacher || hybrid) per token")
    ax.set_title(f"healing layers {heal['linear_layers']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_score_with_healing(trajectory: Mapping[str, Any], healing: Mapping[str, Any], path: str | Path,
                            metric: str = "score") -> Path:
    """`trajectory` is `GreedyResult.to_dict()`; `healing` is `ContinuedResult.to_dict()` (or, for M_opt healed
    alone, {"heals": [{"layers", "score", "ok"}], "rounds": []})."""
    fig, ax = plt.subplots(figsize=(8.8, 4.0))
    rounds = trajectory["rounds"]
    xs = [0] + [len(r["committed_before"]) + 1 for r in rounds]
    ys = [trajectory["teacher_score"]] + [r["score"] for r in rounds]
    ax.plot(xs, ys, color="tab:blue", linewidth=1.5, marker="o", markersize=5, label="without healing (greedy)")
    continued = healing.get("rounds") or []
    if continued:  # committed rounds joined; rejected ones (a heal and a rerun, or the end) hollow
        committed = [r for r in continued if r["accepted"]]
        ax.plot([len(r["committed_before"]) + 1 for r in committed], [r["score"] for r in committed],
                color="tab:orange", linewidth=1, linestyle=":", marker="o", markersize=5,
                label="continued search from the healed hybrid")
        rejected = [r for r in continued if not r["accepted"]]
        ax.scatter([len(r["committed_before"]) + 1 for r in rejected], [r["score"] for r in rejected], s=30,
                   color="white", edgecolor="tab:orange", zorder=3, label="continued round rejected")
    heals = [h for h in healing.get("heals") or [] if h["ok"] and h["score"] is not None]
    if heals:
        ax.plot([len(h["layers"]) for h in heals], [h["score"] for h in heals], color="tab:green", linewidth=1.5,
                marker="s", markersize=7, label="healed hybrid")
    ax.scatter([0], [trajectory["teacher_score"]], s=40, color="black", zorder=4, label="teacher")
    ax.axhline(trajectory["p_min"], color="tab:red", linestyle="--", linewidth=1,
               label=f"threshold P_min = {trajectory['p_min']:.3f}")
    all_x = xs + [len(r["committed_before"]) + 1 for r in continued] + [len(h["layers"]) for h in heals]
    ax.set_xticks(range(0, max(all_x) + 1))
    ax.set_xlabel("number of linear-attention layers")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("score vs linear layers, with and without healing")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the points stay visible
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from dtr_core.artifacts import atomic_path

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
