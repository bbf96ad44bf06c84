"""Flow `convert`: the whole DtR conversion of a pretrained transformer for one task, as Prefect tasks.

It follows the numbered listing of `dtr_core/search/reference.py` (and chooses the same layers; tested):

    0. parameters validated before any work; one MLflow parent run with the full config
    1. P_base: the teacher on the task's validation split (search) and test split (report)
    2. phase 1 (sub-flow `distill`): the teacher streams the corpus; a block of layers' students per task, in parallel
    3. phase 2 (sub-flow `replace`): greedy replacement, every candidate of a round its own task
    4. export M_best and M_opt as hybrid folders; score both on validation and test
    5. measure prefill/decode speed and cache size of teacher, M_best, M_opt (sub-flow `benchmark`)
    6. plots, summary, and — only now that everything succeeded — register M_best and M_opt in MLflow

Resume: the run folder is named by a hash of the parameters that decide the result, so the same parameters
land in the same folder; completed layers, candidates, exports and evaluations are reused by content key
(a distillation block killed mid-way resumes from its checkpoint). `summary.json` is written last: a folder without it is an unfinished run.
One process per run folder: the flow holds `runs/<run_id>/.lock` (`dtr_core/run_lock.py`) from before its
first write until it ends; a second conversion of the same run id stops at once with one line. The folder
records its MLflow parent run (`mlflow_run.json`): a resumed run reattaches to it, and a finished run that
is run again registers no new version (`tasks/tracking.py`, `tasks/registry.py`). Params, tags and the
summary carry the tracking URI and Dask address with credentials masked.
Sub-flow results reach tasks `quote`d: Prefect would otherwise record them as `flow_run` task inputs, which
the default UI cannot show (the parent run's Task Runs tab stays empty; PrefectHQ/prefect#18680).
Runners: see `flows/runners.py`; call `run_convert(params)` (what `dtr convert` does) to get the shared
temporary Prefect API that process and Dask workers need in embedded mode.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from dtr_core.artifacts import remove_temporaries, write_json, write_marker
from dtr_core.redaction import redact
from dtr_core.run_layout import RunLayout
from dtr_core.run_lock import run_folder_lock
from flows.benchmark import benchmark as benchmark_flow
from flows.distill import distill as distill_flow
from flows.heal import heal as heal_flow
from flows.heal import heal_and_continue as heal_and_continue_flow
from flows.replace import replace as replace_flow
from flows.run_names import run_name
from flows.runners import dask_cluster, make_task_runner, shared_api
from tasks.context import RunContext
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.params import (
    AcceptanceParams,
    ConvertParams,
    DistillBudget,
    HealParams,
    MixerName,
    ModelSource,
    RunnerParams,
    SpeedParams,
    TaskParams,
    ToleranceParams,
    TrackingParams,
    check_params_once,
    describe_parameters,
    one_line,
)
from tasks.pyfunc_model import task_card
from tasks.registry import register_task, describe_test_set, version_facts
from tasks.report import ROLES as REPORT_ROLES
from tasks.report import failed_layers, plots_task, publish_summary_task, summary_rows
from tasks.runtime import serial_threads
from tasks.runtime import task as build_task
from tasks.tracking import Tracking, resolve_tracking_uri

DEFAULTS = ConvertParams()
FAIL_MARK_SECONDS = 10.0  # marking the MLflow run FAILED after a failure waits at most this long


@flow(name="convert", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True,
      flow_run_name=run_name("convert"),
      description="Distill-then-Replace: a task-specific hybrid of full and linear attention from a pretrained model")
@describe_parameters(ConvertParams)  # the form's help text: ConvertParams's descriptions
def convert(
    model: ModelSource = DEFAULTS.model,
    task: TaskParams = DEFAULTS.task,
    mixer: MixerName = DEFAULTS.mixer,
    distill: DistillBudget = DEFAULTS.distill,
    tolerance: ToleranceParams = DEFAULTS.tolerance,
    acceptance: AcceptanceParams = DEFAULTS.acceptance,
    max_layers: int | None = DEFAULTS.max_layers,
    seed: int = DEFAULTS.seed,
    runner: RunnerParams = DEFAULTS.runner,
    speed: SpeedParams = DEFAULTS.speed,
    heal: HealParams = DEFAULTS.heal,
    tracking: TrackingParams = DEFAULTS.tracking,
    output_dir: str = DEFAULTS.output_dir,
    run_id: str | None = DEFAULTS.run_id,
) -> dict[str, Any]:
    """Convert `model` for `task`; returns the summary (also `runs/<run_id>/summary.json`)."""
    from pydantic import ValidationError

    try:
        params = ConvertParams(model=model, task=task, mixer=mixer, distill=distill, tolerance=tolerance,
                               acceptance=acceptance, max_layers=max_layers, seed=seed, runner=runner, speed=speed,
                               heal=heal, tracking=tracking, output_dir=output_dir, run_id=run_id)
    except ValidationError as error:
        raise ValueError(one_line(error)) from None
    check_params_once(params)  # 0. bad parameters: one line, before any work (skipped when the CLI just checked)
    return _convert(params)


def _convert(params: ConvertParams) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    run_id = params.resolved_run_id()
    layout = RunLayout(Path(params.output_dir).resolve() / run_id)
    with run_folder_lock(layout.root):  # one process per run folder, before anything is written there
        write_marker(layout.root, kind="run")
        for path in remove_temporaries(layout.root):  # what a killed attempt's atomic writes left behind
            logger.info("removed %s, left by an interrupted attempt", path)
        layout.summary.unlink(missing_ok=True)  # a re-run is unfinished until it finishes
        values = public_params(params)
        write_json(layout.config, {**values, "run_id": run_id})
        tracking = Tracking.start_parent(
            resolve_tracking_uri(params.tracking.tracking_uri), params.tracking.experiment, run_id, values,
            tags={"dtr.model": params.model, "dtr.task": params.task.label, "dtr.mixer": params.mixer,
                  "dtr.run_dir": str(layout.root), "prefect.flow_run_id": str(FlowRunContext.get().flow_run.id)},
            run_dir=layout.root)
        logger.info("run %s in %s; MLflow run %s", run_id, layout.root, tracking.parent_run_id)
        ctx = RunContext(model=params.model, run_dir=str(layout.root), mixer=params.mixer, tracking=tracking,
                         threads=serial_threads())
        try:
            summary = _steps(params, ctx, started)
        except BaseException:
            tracking.finish("FAILED", wait=FAIL_MARK_SECONDS)  # best effort: the store may be what failed
            raise
        tracking.finish("FINISHED")
        return summary


def public_params(params: ConvertParams) -> dict[str, Any]:
    """The parameters as JSON, with credentials in the tracking URI and Dask address masked."""
    values = params.model_dump(mode="json")
    values["tracking"]["tracking_uri"] = redact(values["tracking"]["tracking_uri"])
    values["runner"]["dask_address"] = redact(values["runner"]["dask_address"])
    return values


def _steps(params: ConvertParams, ctx: RunContext, started: float) -> dict[str, Any]:
    """Steps 1-6 of the module docstring, in order."""
    teacher_eval = score_teacher(params, ctx)  # 1
    layer_results, trajectory = distill_and_replace(params, ctx)  # 2, 3
    plots_task(str(ctx.layout.reports), quote(trajectory), quote(layer_results), str(ctx.layout.trajectory),
               ctx.tracking)
    roles = {"best": trajectory["best_layers"], "opt": trajectory["opt_layers"]}
    paths, evals = export_and_score(params, ctx, trajectory, roles, teacher_eval)  # 4
    if params.heal.enabled:
        roles.update(heal_opt(params, ctx, trajectory["swap_order"], paths, evals))  # 4b
        if "healed" in roles:  # the healed model's layers: M_opt's, or more after heal-then-continue
            trajectory = {**trajectory, "healed_layers": roles["healed"]}
    speeds = measure_speeds(params, ctx, paths, roles)  # 5
    summary = summarise(params, ctx, trajectory, layer_results, evals, speeds, paths)  # 6
    if params.tracking.register_models:
        summary["registered"] = register(params, ctx, roles, paths, summary)
    summary["seconds"] = time.perf_counter() - started
    return publish_summary_task(quote(summary), str(ctx.layout.summary), ctx.tracking)


def score_teacher(params: ConvertParams, ctx: RunContext) -> dict[str, Any]:
    """1. P_base: the teacher on validation (the search's reference) and test (the report)."""
    task = params.task
    teacher_eval = evaluate_task(ctx.model, task, {"validation": task.validation_limit, "test": task.test_limit},
                                 "teacher", str(ctx.layout.reports / "eval_teacher.json"), ctx.threads)
    ctx.tracking.log_metrics({"teacher_validation": teacher_eval["validation"]["score"],
                              "teacher_test": teacher_eval["test"]["score"]})
    ctx.tracking.set_tags({"dtr.metric": teacher_eval["validation"]["metric"]})  # the metric searched on, resolved
    get_run_logger().info("teacher: validation %s %.4f, test %.4f", teacher_eval["validation"]["metric"],
                          teacher_eval["validation"]["score"], teacher_eval["test"]["score"])
    return teacher_eval


def distill_and_replace(params: ConvertParams, ctx: RunContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """2. phase 1 (one task per block of layers) and 3. phase 2 (one task per candidate), on one runner (one Dask
    cluster)."""
    with dask_cluster(params.runner) as dask_address:
        layer_results = distill_flow.with_options(task_runner=make_task_runner(params.runner, dask_address))(
            model=params.model, budget=params.distill, mixer=params.mixer, seed=params.seed, run_dir=ctx.run_dir,
            runner=params.runner, tracking=ctx.tracking)
        failed = [r["layer"] for r in layer_results if r["status"] != "ok"]
        ctx.tracking.log_metrics({"layers_distilled": len(layer_results) - len(failed), "layers_failed": len(failed)})
        trajectory = replace_flow.with_options(task_runner=make_task_runner(params.runner, dask_address))(
            model=params.model, task=params.task, mixer=params.mixer, run_dir=ctx.run_dir,
            tolerance=params.tolerance, acceptance=params.acceptance, max_layers=params.max_layers,
            seed=params.seed, runner=params.runner, tracking=ctx.tracking)
    return layer_results, trajectory


def export_and_score(params: ConvertParams, ctx: RunContext, trajectory: dict[str, Any],
                     roles: dict[str, list[int]], teacher_eval: dict[str, Any]):
    """4. export M_best and M_opt; their validation and test scores. Returns ({role: path}, {role: eval})."""
    logger, task, layout = get_run_logger(), params.task, ctx.layout
    limits = {"validation": task.validation_limit, "test": task.test_limit}
    paths, evals = {"teacher": params.model}, {"teacher": teacher_eval}
    for role, layers in roles.items():
        if role == "opt" and list(layers) == list(roles["best"]):  # one model, two names: export and score once
            paths["opt"], evals["opt"] = str(layout.alias_hybrid("opt", paths["best"])), evals["best"]
            logger.info("M_opt = M_best (%d linear layers %s): %s links to it", len(layers), layers, paths["opt"])
            continue
        if layout.hybrid(role).is_symlink():  # an earlier run's alias: export a folder of its own instead
            layout.hybrid(role).unlink()
        export = export_task(ctx, quote(layers), role, quote({"run_id": layout.root.name,
                                                              "search_score": trajectory[f"{role}_score"]}))
        paths[role] = export["path"]
        evals[role] = evaluate_task(export["path"], task, limits, role, str(layout.reports / f"eval_{role}.json"),
                                    ctx.threads)
        logger.info("M_%s: %d linear layers %s, validation %.4f, test %.4f", role, len(layers), layers,
                    evals[role]["validation"]["score"], evals[role]["test"]["score"])
    return paths, evals


def heal_opt(params: ConvertParams, ctx: RunContext, swap_order: list[int], paths: dict[str, str],
             evals: dict[str, Any]) -> dict[str, list[int]]:
    """4b. heal M_opt end to end (sub-flow `heal`), or with heal.every > 0 heal it and continue the search from it
    (sub-flow `heal-and-continue`): an extra model, `healed`; {} when there is nothing to heal or the heal failed
    (the run keeps the unhealed models)."""
    if not swap_order:
        get_run_logger().info("heal: M_opt has no linear layer; nothing to heal")
        return {}
    if params.heal.every:
        healed = heal_and_continue_flow(
            start_order=list(swap_order), model=params.model, task=params.task, mixer=params.mixer,
            run_dir=ctx.run_dir, heal=params.heal, tolerance=params.tolerance, acceptance=params.acceptance,
            max_layers=params.max_layers, seed=params.seed, tracking=ctx.tracking)
        layers = healed["continued"]["healed_layers"]
        if healed["status"] == "ok":
            healed["path"] = str(ctx.layout.alias_hybrid("healed", healed["path"]))
    else:
        layers = sorted(swap_order)
        healed = heal_flow(layers=layers, model=params.model, task=params.task, mixer=params.mixer,
                           run_dir=ctx.run_dir, heal=params.heal, seed=params.seed, tracking=ctx.tracking)
    if healed["status"] != "ok":
        return {}
    paths["healed"], evals["healed"] = healed["path"], healed["eval"]
    return {"healed": list(layers)}


def measure_speeds(params: ConvertParams, ctx: RunContext, paths: dict[str, str],
                   roles: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
    """5. speed at a long context, the models' repeats interleaved in this process (a healed model with M_opt's
    layers is not measured again: the same architecture, the same speed)."""
    roles = roles or {}
    distinct = ["teacher", "best"] + (["opt"] if not os.path.samefile(paths["opt"], paths["best"]) else [])
    if "healed" in paths and sorted(roles.get("healed", [])) != sorted(roles.get("opt", [])):
        distinct.append("healed")
    measured = benchmark_flow(models=[paths[role] for role in distinct],
                              labels=["teacher" if role == "teacher" else f"M_{role}" for role in distinct],
                              speed=params.speed)
    speeds = dict(zip(distinct, measured))
    speeds.setdefault("opt", speeds["best"])
    if "healed" in paths:
        speeds.setdefault("healed", speeds["opt"])  # M_opt's architecture, only other weights: the same speed
    write_json(ctx.layout.reports / "speed.json", measured)
    return speeds


def summarise(params: ConvertParams, ctx: RunContext, trajectory: dict[str, Any],
              layer_results: list[dict[str, Any]], evals: dict[str, Any], speeds: dict[str, Any],
              paths: dict[str, str]) -> dict[str, Any]:
    """6. the summary (registration and wall time are added by the caller)."""
    tracking = ctx.tracking
    return {
        "run_id": ctx.layout.root.name, "run_dir": ctx.run_dir, "model": params.model, "task": params.task.label,
        "mixer": params.mixer, "metric": evals["teacher"]["validation"]["metric"],
        "num_layers": trajectory["num_layers"], "p_min": trajectory["p_min"],
        "stop_reason": trajectory["stop_reason"], "speed": params.speed.model_dump(),
        "rounds": len(trajectory["rounds"]), "swap_order": trajectory["swap_order"],
        "rows": summary_rows(trajectory, evals, speeds, paths),
        "failed_layers": failed_layers(layer_results),
        "mlflow": {"uri": redact(tracking.uri), "experiment_id": tracking.experiment_id,
                   "run_id": tracking.parent_run_id, "url": tracking.run_url()},
        "registered": None,
    }


def register(params: ConvertParams, ctx: RunContext, roles: dict[str, list[int]], paths: dict[str, str],
             summary: dict[str, Any]) -> dict[str, Any]:
    """6. register M_best and M_opt (and M_healed), only now that every step succeeded; each version described
    by its summary row (layers, scores, test set, speed)."""
    card = task_card(build_task(params.task))
    rows = {role: row for role, name in REPORT_ROLES for row in summary["rows"] if row["model"] == name}
    facts = {role: version_facts(rows[role], rows["teacher"], summary, describe_test_set(params.task)) for role in roles}
    return register_task(ctx.tracking, params.registered_name(), quote({role: paths[role] for role in roles}), quote(card),
                         quote({role: description for role, (_, description) in facts.items()}),
                         quote({role: tags for role, (tags, _) in facts.items()}), params.tracking.promote)


def run_convert(params: ConvertParams) -> dict[str, Any]:
    """Run the `convert` flow with the shared API its runner needs (see flows/runners.py). The flow checks the
    parameters unless this process already checked the same ones (`dtr convert` does, before Prefect starts)."""
    with shared_api(params.runner.kind):
        return convert(**{name: getattr(params, name) for name in ConvertParams.model_fields})
