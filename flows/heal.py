"""Sub-flow `heal`: after the search, train the searched hybrid end to end towards the teacher, then score it.

The healed hybrid is an extra model (`hybrids/healed`, MLflow alias `healed`): M_best and M_opt keep the
paper's meaning, the unhealed search's results. A heal that diverges saves nothing; the run goes on with the
unhealed models and the heal's MLflow child run is FAILED with the reason.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.context import RunContext
from tasks.evaluate import evaluate_task
from tasks.heal import heal_task
from tasks.plots import plot_heal
from tasks.params import ConvertParams, HealParams, MixerName, TaskParams
from tasks.runtime import serial_threads
from tasks.tracking import Tracking


@flow(name="heal", description="Heal the searched hybrid end to end (KL to the teacher's next-token "
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
    record = heal_task(ctx, layers, heal.config(seed), heal.corpus,
                       metadata={"run_id": ctx.layout.root.name, "unhealed_layers": layers})
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
    if tracking is not None:
        tracking.log_metrics({"healed_validation": evals["validation"]["score"], "healed_test": evals["test"]["score"],
                              "heal_initial_kl": result["initial_kl"], "heal_final_kl": result["final_kl"]})
    return {"status": "ok", "heal": result, "path": record["path"], "eval": evals}
