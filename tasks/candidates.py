"""Task: score one greedy candidate (current hybrid + one more linear layer) and log its MLflow child run.

The round's shared work (a copy of the model with the committed layers swapped, and the hidden states
entering every layer) is built once per process by `runtime.round_scorer`; this task scores one layer
with it (`dtr_core.search.scorer.RoundScorer.score`: prefix reuse, exact early rejection shared with the
round's other candidates in the process). Every scored candidate is written to
`greedy/candidates/rNN_lLLL.json` with a key over everything that decides it
(`dtr_core.artifacts.reuse_or_compute`), so a run killed in the middle of a round resumes without
rescoring finished candidates.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime
from tasks.context import RunContext
from tasks.params import TaskParams


def candidate_key(run_key: str, students_dir: str, committed: tuple[int, ...], layer: int) -> str:
    from dtr_core.artifacts import hash_json, read_json
    from dtr_core.distill.training import META, layer_dir

    students = {str(i): read_json(layer_dir(students_dir, i) / META)["key"] for i in (*committed, layer)}
    return hash_json({"run": run_key, "committed": list(committed), "layer": layer, "students": students})


@task(name="score-candidate", cache_policy=NO_CACHE, task_run_name="round-{round_index:02d}-layer-{layer:03d}")
def score_candidate_task(ctx: RunContext, task_params: TaskParams, committed: tuple[int, ...], layer: int,
                         round_index: int, run_key: str) -> dict[str, Any]:
    """`CandidateScore.to_dict()` of `committed + (layer,)` on the first `task_params.validation_limit`
    validation examples (plus `seconds`, `reused`)."""
    from dtr_core.artifacts import reuse_or_compute

    committed = tuple(committed)
    students_dir = str(ctx.layout.students)

    def score() -> dict[str, Any]:
        started = time.perf_counter()
        with runtime.torch_threads(ctx.threads):
            scorer = runtime.round_scorer(ctx.model, task_params, students_dir, ctx.mixer, committed,
                                          task_params.validation_limit)
            result = scorer.score(layer)
        return {"round": round_index, "layer": layer, "committed": list(committed), "score": result.to_dict(),
                "seconds": round(time.perf_counter() - started, 3)}

    record, reused = reuse_or_compute(ctx.layout.candidate(round_index, layer),
                                      candidate_key(run_key, students_dir, committed, layer), score,
                                      label=f"round {round_index} layer {layer}")
    result = {**record["score"], "seconds": record["seconds"], "reused": reused}
    if ctx.tracking is not None:
        ctx.tracking.child_run(
            f"r{round_index:02d}-l{layer:03d}",
            params={"round": round_index, "layer": layer, "committed": ",".join(map(str, committed)) or "none",
                    "linear_layers_with_candidate": len(committed) + 1},
            metrics={"score": result["score"], "upper_bound": result["upper_bound"],
                     "evaluated_fraction": result["evaluated_fraction"], "seconds": result["seconds"],
                     "round": round_index, "layer": layer},
            tags={"dtr.kind": "candidate", "dtr.round": round_index, "dtr.layer": layer,
                  "dtr.rejected_early": result["rejected_early"], "dtr.reused": result["reused"]},
        )
    return result
