"""Tasks that report a conversion: plots + trajectory to MLflow, the summary (JSON, MLflow metrics, Prefect
markdown artifact), and the pure functions that build the summary table (also used by `dtr convert`).

Summary rows: teacher, M_best, M_opt (and M_healed, M_opt healed end to end, when healing ran) — linear layers, validation and test score, decoding cache size at the
benchmark context, measured prefill and decode speedups vs the teacher. `failed_layers` lists the layers whose
student failed (never offered to the search), each with its reason; the markdown names them under the table.

Prefect artifacts: the summary (markdown) and, when MLflow is a server, links to the MLflow run and to each
registered version, all on the `convert` flow run; a table that grows during a run (the greedy rounds) is one
artifact updated in place (`publish_table`), not a new card per update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from dtr_core.speed import speedup
from tasks.tracking import Tracking

ROLES = (("teacher", "teacher"), ("best", "M_best"), ("opt", "M_opt"), ("healed", "M_healed"))


@task(name="plots", cache_policy=NO_CACHE)
def plots_task(reports_dir: str, trajectory: dict[str, Any], layer_results: list[dict[str, Any]],
               trajectory_file: str, tracking: Tracking | None) -> list[str]:
    """Write the three plots to `reports_dir` and log them (and the trajectory JSON) to the parent run."""
    from tasks.plots import plot_distill_losses, plot_layer_map, plot_score_trajectory

    reports = Path(reports_dir)
    paths = [
        plot_score_trajectory(trajectory, reports / "score_vs_linear_layers.png", trajectory.get("metric", "score")),
        plot_distill_losses(layer_results, reports / "distill_normalized_loss.png"),
        plot_layer_map(trajectory["num_layers"], {"M_best": trajectory["best_layers"],
                                                  "M_opt": trajectory["opt_layers"]}, reports / "layer_map.png"),
    ]
    if tracking is not None:
        for path in paths:
            tracking.log_artifact(path, "plots")
        tracking.log_artifact(trajectory_file, "greedy")
    return [str(p) for p in paths]


def publish_table(rows: list[dict[str, Any]], key: str, description: str, artifact_id: UUID | None = None) -> UUID:
    """The table artifact `key` of this run: created when `artifact_id` is None, else that artifact updated in
    place. Returns the artifact id to pass to the next call."""
    from prefect.artifacts import TableArtifact, create_table_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    if artifact_id is None:
        return create_table_artifact(rows, key=key, description=description)
    data = TableArtifact(table=rows).format(_sync=True)
    get_client(sync_client=True).update_artifact(artifact_id, ArtifactUpdate(data=data, description=description))
    return artifact_id


def summary_links(summary: dict[str, Any]) -> list[dict[str, str]]:
    """`[{"key", "link", "text"}]`: the MLflow run and each registered version, when MLflow is a server (a sqlite
    store has no address to link to; the markdown says how to open it)."""
    from dtr_core.run_layout import slug

    links = []
    if summary["mlflow"]["url"].startswith(("http://", "https://")):
        links.append({"key": f"mlflow-run-{slug(summary['run_id'], 40)}", "link": summary["mlflow"]["url"],
                      "text": f"MLflow run of {summary['run_id']}"})
    for role, info in (summary.get("registered") or {}).items():
        if (info.get("url") or "").startswith(("http://", "https://")):
            links.append({"key": f"mlflow-model-{slug(summary['run_id'], 40)}-{role}", "link": info["url"],
                          "text": f"{info['registered_uri']} (version {info['version']})"})
    return links


def summary_rows(trajectory: dict[str, Any], evals: dict[str, dict[str, Any]], speeds: dict[str, dict[str, Any]],
                 paths: dict[str, str]) -> list[dict[str, Any]]:
    """teacher / M_best / M_opt rows. `evals[role][split]` are EvalResult dicts, `speeds[role]` SpeedResult dicts."""
    layers = {"teacher": [], "best": trajectory["best_layers"], "opt": trajectory["opt_layers"],
              "healed": trajectory.get("healed_layers", trajectory["opt_layers"])}
    base = speeds["teacher"]
    rows = []
    for role, name in ROLES:
        if role not in evals:  # M_healed: only when healing ran and succeeded
            continue
        speed = speeds[role]
        rows.append({
            "model": name,
            "linear_layers": list(layers[role]),
            "num_linear": len(layers[role]),
            "validation": evals[role]["validation"]["score"],
            "test": evals[role]["test"]["score"],
            "cache_bytes": speed["cache_bytes"],
            "prefill_seconds": speed["prefill_seconds"],
            "decode_tokens_per_second": speed["decode_tokens_per_second"],
            **speedup(base, speed),
            "long_context_len": speed.get("long_context_len"),
            "long_cache_bytes": speed.get("long_cache_bytes"),
            "long_decode_tokens_per_second": speed.get("long_decode_tokens_per_second"),
            "path": paths[role],
        })
    return rows


def failed_layers(layer_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`[{"layer", "reason"}]` of every layer whose student failed, by layer (`LayerResult.to_dict()` inputs)."""
    return [{"layer": r["layer"], "reason": r.get("reason") or "failed"}
            for r in sorted(layer_results, key=lambda r: r["layer"]) if r["status"] != "ok"]


def summary_markdown(summary: dict[str, Any]) -> str:
    """The Prefect markdown artifact: the table, where things are, the MLflow link."""
    context = summary["speed"]["context_len"]
    lines = [
        f"# dtr conversion `{summary['run_id']}`",
        "",
        f"{summary['model']} on **{summary['task']}** ({summary['metric']}), mixer `{summary['mixer']}`, "
        f"{summary['num_layers']} layers; search stopped: {summary['stop_reason']} "
        f"(P_min {summary['p_min']:.4f}).",
        "",
        f"| model | linear layers | validation | test | KV cache @ {context} | prefill speedup | decode speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        linear = ", ".join(map(str, row["linear_layers"])) or "none"
        lines.append(f"| {row['model']} | {row['num_linear']} ({linear}) | {row['validation']:.4f} | {row['test']:.4f} "
                     f"| {row['cache_bytes'] / 2**20:.1f} MB | {row['prefill_speedup']:.2f}x | {row['decode_speedup']:.2f}x |")
    failed = summary.get("failed_layers") or []
    if failed:
        lines += ["", f"{len(failed)} layer(s) failed distillation and were never offered to the search:"]
        lines += [f"- layer {f['layer']}: {f['reason']}" for f in failed]
    lines += ["", f"- run folder: `{summary['run_dir']}`",
              f"- MLflow run: {_link(summary['mlflow']['url'])}"]
    for role, info in (summary.get("registered") or {}).items():
        version = f"[version {info['version']}]({info['url']})" if info.get("url") else f"version {info['version']}"
        lines.append(f"- registered: `{info['registered_uri']}` ({version})"
                     + (f"; {info['reason']}" if info.get("reason") else ""))
    lines.append(f"- wall time: {summary['seconds'] / 60:.1f} min")
    return "\n".join(lines) + "\n"


def _link(url: str) -> str:
    return f"[{url}]({url})" if url.startswith(("http://", "https://")) else f"`{url}`"


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary_task(summary: dict[str, Any], summary_file: str, tracking: Tracking | None) -> dict[str, Any]:
    """Parent-run metrics and summary artifact, the Prefect markdown artifact, then `summary.json` (last)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from dtr_core.artifacts import write_json
    from dtr_core.run_layout import slug

    if tracking is not None:
        metrics: dict[str, float] = {"seconds": summary["seconds"]}
        for row in summary["rows"]:
            prefix = {name: role for role, name in ROLES}[row["model"]]
            metrics.update({f"{prefix}_validation": row["validation"], f"{prefix}_test": row["test"],
                            f"{prefix}_cache_mb": row["cache_bytes"] / 2**20})
            if prefix != "teacher":
                metrics.update({f"{prefix}_layers_linear": row["num_linear"],
                                f"{prefix}_kv_cache_reduction": row["cache_reduction"],
                                f"{prefix}_prefill_speedup": row["prefill_speedup"],
                                f"{prefix}_decode_speedup": row["decode_speedup"]})
                if row.get("long_decode_speedup") is not None:
                    metrics[f"{prefix}_long_decode_speedup"] = row["long_decode_speedup"]
        metrics["layers_swapped"] = summary["rows"][2]["num_linear"]
        tracking.log_metrics(metrics)
    create_markdown_artifact(summary_markdown(summary), key=f"dtr-summary-{slug(summary['run_id'], 40)}",
                             description=f"dtr conversion {summary['run_id']}")
    for link in summary_links(summary):
        create_link_artifact(link["link"], link_text=link["text"], key=link["key"], description=link["text"])
    write_json(summary_file, summary)  # last: the run is complete
    if tracking is not None:
        tracking.log_artifact(summary_file)
    return summary
