"""Sub-flows `heal` and `heal-and-continue`: after the search, train the hybrid end to end towards the teacher.

`heal` (heal.every = 0): M_opt healed once. `heal-and-continue` (heal.every = H > 0): M_opt healed, then the
greedy search goes on from the healed hybrid, healing again every H committed layers
(`dtr_core.heal.continued_search`, whose decisions this flow drives; the candidates of a round are tasks
as in `flows/replace.py`). Either way the result is an extra model, `healed` (`hybrids/healed`, MLflow alias
`healed`): M_opt healed, or the continued search's last healed hybrid. M_best and M_opt keep the paper's
meaning, the unhealed search's results. A heal that diverges saves nothing; its MLflow child run is FAILED
with the reason, and the run keeps what healed before it (nothing, when M_opt's heal failed).

The continued search's folders: `continued/heal_NN/` holds heal NN's hybrid (`hybrids/healed`), the
students after it (`students/`: `dtr_core.heal.students`) and the candidates scored with them
(`greedy/candidates/`); `continued/greedy/round_NN.json` are the continued rounds (numbered on from the
ordinary search's), `continued/trajectory.json` the `ContinuedResult`. MLflow: child runs `heal-NN` and the candidates' runs,
parent metrics `continued_round_best_score` (step: round, numbered on from the ordinary search's) and
`continued_heal_score` (step: heal). The plot `score_vs_linear_layers_healing.png` shows both searches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dtr_core.artifacts import hash_json, read_json, write_json
from dtr_core.run_layout import RunLayout
from flows.replace import CandidateScorer, RoundRecorder
from flows.run_names import run_name
from tasks.context import RunContext
from tasks.evaluate import evaluate_task
from tasks.heal import heal_task
from tasks.plots import plot_heal, plot_score_with_healing
from tasks.params import (AcceptanceParams, ConvertParams, HealParams, MixerName, TaskParams, ToleranceParams)
from tasks.runtime import serial_threads
from tasks.tracking import Tracking

SCORE_PLOT = "score_vs_linear_layers_healing.png"


@flow(name="heal", flow_run_name=run_name("heal"), description="Heal the searched hybrid end to end (KL to the teacher's next-token "
                               "distribution, students only), then score it on the task")
def heal(
    layers: list[int],
    model: str = ConvertParams.model_fields["model"].default,
    task: TaskParams = TaskParams(),
    mixer: MixerName = ConvertParams.model_fields["mixer"].default,
    run_dir: str = "runs/distill",
    heal: HealParams = HealParams(),
    seed: int = ConvertParams.model_fields["seed"].default,
    tracking: Tracking | None = None,
) -> dict[str, Any]:
    """{"status", "heal" (HealResult dict), "path", "eval" ({split: EvalResult dict}, when it succeeded)}."""
    logger = get_run_logger()
    ctx = RunContext(model=model, run_dir=str(run_dir), mixer=mixer, tracking=tracking, threads=serial_threads())
    logger.info("heal: %d linear layers %s, %d steps of %d x %d tokens at lr %g", len(layers), layers,
                heal.steps, heal.batch_size, heal.seq_len, heal.lr)
    if ctx.layout.hybrid("healed").is_symlink():  # an earlier heal-and-continue's alias: a folder of its own now
        ctx.layout.hybrid("healed").unlink()
    record = heal_task(ctx, layers, heal.config(seed), heal.corpus,
                       metadata={"run_id": ctx.layout.root.name, "unhealed_layers": layers}, task_params=task)
    result = record["heal"]
    if record["path"] is None:
        logger.warning("heal failed (%s); the run keeps the unhealed hybrids", result["reason"])
        return {"status": "failed", "heal": result, "path": None}
    plot = plot_heal(result, ctx.layout.reports / "heal_kl.png")
    if tracking is not None:
        tracking.log_artifact(plot, "plots")
    limits = {"validation": task.validation_limit, "test": task.test_limit}
    evals = evaluate_task(record["path"], task, limits, "healed", str(ctx.layout.reports / "eval_healed.json"),
                          ctx.threads)
    logger.info("healed: held-out KL %.4f -> %.4f; validation %.4f, test %.4f", result["initial_kl"],
                result["final_kl"], evals["validation"]["score"], evals["test"]["score"])
    _log_healed(tracking, result, evals)
    healing = {"heals": [{"layers": sorted(layers), "score": evals["validation"]["score"], "ok": True}], "rounds": []}
    _plot_scores(ctx, healing, tracking)
    return {"status": "ok", "heal": result, "path": record["path"], "eval": evals}


@flow(name="heal-and-continue", flow_run_name=run_name("heal-and-continue"), description="Heal M_opt, then continue the greedy search from the healed hybrid, "
                                            "healing again every heal.every committed layers")
def heal_and_continue(
    start_order: list[int],
    model: str = ConvertParams.model_fields["model"].default,
    task: TaskParams = TaskParams(),
    mixer: MixerName = ConvertParams.model_fields["mixer"].default,
    run_dir: str = "runs/distill",
    heal: HealParams = HealParams(every=1),
    tolerance: ToleranceParams = ToleranceParams(),
    acceptance: AcceptanceParams = AcceptanceParams(),
    max_layers: int | None = ConvertParams.model_fields["max_layers"].default,
    seed: int = ConvertParams.model_fields["seed"].default,
    tracking: Tracking | None = None,
) -> dict[str, Any]:
    """From M_opt's swap order `start_order`: {"status", "continued" (ContinuedResult dict), "heal" (the last
    successful heal's HealResult dict), "path", "eval"} (path and eval: the final healed hybrid's, when any)."""
    from dtr_core.distill.training import read_layer_results
    from dtr_core.heal.continued_search import continue_with_healing
    from dtr_core.search.decisions import layer_cap
    from tasks import runtime

    if heal.every < 1:
        raise ValueError(f"heal-and-continue needs heal.every >= 1, got {heal.every}")
    logger = get_run_logger()
    ctx = RunContext(model=model, run_dir=str(run_dir), mixer=mixer, tracking=tracking, threads=serial_threads())
    layout = ctx.layout
    available = sorted(layer for layer, result in read_layer_results(layout.students).items() if result.ok)
    teacher = evaluate_task(model, task, {"validation": task.validation_limit, "test": task.test_limit}, "teacher",
                            str(layout.reports / "eval_teacher.json"), ctx.threads, per_example=True)["validation"]
    tolerance_obj = tolerance.build()
    stages = _Stages(ctx, task, heal, seed, tracking)
    first_round = len(read_json(layout.trajectory)["rounds"])
    p_min = tolerance_obj.threshold(teacher["score"])
    logger.info("heal-and-continue from M_opt %s: heal every %d committed layers, P_min %.4f",
                start_order, heal.every, p_min)
    recorder = RoundRecorder(RunLayout(layout.root / "continued"), p_min, tracking, prefix="continued_",
                             table_name=layout.root.name)  # rounds to continued/greedy/round_NN.json, one table

    result = continue_with_healing(
        stages.heal, stages.score_candidates, available, start_order, teacher["score"], tolerance_obj, heal.every,
        acceptance.build(seed), teacher_per_example=teacher["per_example"],
        cap=layer_cap(runtime.num_layers(model), max_layers), first_round_index=first_round,
        on_round=lambda continued_round: recorder(continued_round.record))
    continued = {**result.to_dict(), "metric": teacher["metric"]}
    write_json(layout.root / "continued" / "trajectory.json", continued)
    logger.info("heal-and-continue done (%s): %d heals, %d rounds; healed hybrid %s (validation %s)",
                result.stop_reason, len(result.heals), len(result.rounds), list(result.healed_layers),
                "n/a" if result.healed_score is None else f"{result.healed_score:.4f}")
    _plot_scores(ctx, continued, tracking)
    last = next((point for point in reversed(result.heals) if point.ok), None)
    if last is None:
        return {"status": "failed", "continued": continued, "heal": stages.records[0]["heal"], "path": None}
    record = stages.records[last.index]
    plot = plot_heal(record["heal"], layout.reports / "heal_kl.png")
    if tracking is not None:
        tracking.log_artifact(plot, "plots")
        tracking.log_metrics({"continued_layers_linear": len(result.healed_layers),
                              "continued_heals": len(result.heals)})
    limits = {"validation": task.validation_limit, "test": task.test_limit}
    evals = evaluate_task(record["path"], task, limits, "healed", str(layout.reports / "eval_healed.json"),
                          ctx.threads)
    _log_healed(tracking, record["heal"], evals)
    return {"status": "ok", "continued": continued, "heal": record["heal"], "path": record["path"], "eval": evals}


class _Stages:
    """The continued search's heals and candidate scoring: heal NN's folder `continued/heal_NN/` is a run layout of
    its own (hybrids/healed, students/, greedy/candidates/) with the run's teacher, task and MLflow parent run."""

    def __init__(self, ctx: RunContext, task: TaskParams, params: HealParams, seed: int, tracking: Tracking | None):
        self.ctx, self.task, self.params, self.seed, self.tracking = ctx, task, params, seed, tracking
        self.records: dict[int, dict[str, Any]] = {}
        self.scorers: dict[int, Any] = {}

    def context(self, index: int) -> RunContext:
        return RunContext(model=self.ctx.model, run_dir=str(self.ctx.layout.root / "continued" / f"heal_{index:02d}"),
                          mixer=self.ctx.mixer, tracking=self.tracking, threads=self.ctx.threads)

    def students_before(self, index: int) -> Path:
        """The students heal `index` starts from: the distilled ones, then each heal's (the search stops at a
        failed heal, so heal index - 1 succeeded)."""
        return self.ctx.layout.students if index == 0 else self.context(index - 1).layout.students

    def heal(self, index: int, order: tuple[int, ...]):
        from dtr_core.heal.continued_search import HealStep

        logger, stage = get_run_logger(), self.context(index)
        layers = sorted(order)
        logger.info("heal %d: %d linear layers %s", index, len(layers), layers)
        record = heal_task(stage, layers, self.params.config(self.seed), self.params.corpus,
                           metadata={"run_id": self.ctx.layout.root.name, "unhealed_layers": layers,
                                     "heal_index": index, "swap_order": list(order)},
                           students_dir=str(self.students_before(index)), students_out=str(stage.layout.students),
                           run_name=f"heal-{index:02d}", task_params=self.task)
        self.records[index] = record
        if record["path"] is None:
            logger.warning("heal %d failed (%s); the search stops", index, record["heal"]["reason"])
            return HealStep(False, reason=record["heal"]["reason"])
        score = evaluate_task(record["path"], self.task, {"validation": self.task.validation_limit},
                              f"heal {index}", str(stage.layout.reports / "eval_healed.json"),
                              stage.threads)["validation"]["score"]
        logger.info("heal %d: held-out KL %.4f -> %.4f; validation %.4f", index, record["heal"]["initial_kl"],
                    record["heal"]["final_kl"], score)
        if self.tracking is not None:
            self.tracking.log_metrics({"continued_heal_score": score, "continued_heal_layers": len(layers)},
                                      step=index)
        return HealStep(True, score)

    def score_candidates(self, heal_index: int, committed, candidates, hint):
        """The candidates of a round whose committed layers use heal `heal_index`'s students, a task each."""
        if heal_index not in self.scorers:
            stage = self.context(heal_index)
            run_key = hash_json({"model": self.ctx.model, "task": self.task.model_dump(mode="json"),
                                 "mixer": self.ctx.mixer, "heal": self.records[heal_index]["key"]})
            self.scorers[heal_index] = CandidateScorer(stage, self.task, run_key, {})
        return self.scorers[heal_index](committed, candidates, hint)


def _log_healed(tracking: Tracking | None, heal_result: dict[str, Any], evals: dict[str, Any]) -> None:
    """The healed model's scores and KL on the MLflow parent run (M_opt's scores are there as opt_*)."""
    if tracking is not None:
        tracking.log_metrics({"healed_validation": evals["validation"]["score"], "healed_test": evals["test"]["score"],
                              "heal_initial_kl": heal_result["initial_kl"], "heal_final_kl": heal_result["final_kl"]})


def _plot_scores(ctx: RunContext, healing: dict[str, Any], tracking: Tracking | None) -> None:
    """Score vs linear layers with and without healing, to reports/ and the parent run's plots/ (when the run
    folder holds the search's trajectory)."""
    if not ctx.layout.trajectory.is_file():
        get_run_logger().info("no greedy trajectory in %s: no score plot", ctx.layout.root)
        return
    trajectory = read_json(ctx.layout.trajectory)
    plot = plot_score_with_healing(trajectory, healing, ctx.layout.reports / SCORE_PLOT,
                                   trajectory.get("metric", "score"))
    if tracking is not None:
        tracking.log_artifact(plot, "plots")
