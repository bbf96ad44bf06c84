"""The `convert` flow end to end on a tiny model: run folder, MLflow runs/metrics/plots/registry, pyfunc.

One conversion (module-scoped) feeds most assertions; it runs under the session's single Prefect test
harness with its own temporary sqlite MLflow store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_support import TINY, mlflow_client, runs_by_kind, tiny_params

pytestmark = pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")


@pytest.fixture(scope="module")
def conversion(prefect_harness, tmp_path_factory):
    from flows.convert import run_convert
    from tasks import runtime

    runtime.clear()
    tmp_path = tmp_path_factory.mktemp("convert")
    params = tiny_params(tmp_path, heal={"enabled": True, "steps": 8, "batch_size": 2, "seq_len": 32, "lr": 3e-3})
    summary = run_convert(params)
    return params, summary


def test_run_folder_is_complete(conversion):
    from dtr_core.artifacts import read_json
    from dtr_core.run_layout import RunLayout

    params, summary = conversion
    layout = RunLayout(summary["run_dir"])
    assert layout.summary.is_file() and read_json(layout.summary)["run_id"] == summary["run_id"]
    assert read_json(layout.config)["model"] == "tiny-llama"
    # students only: no stored activations, no block checkpoint left once its layers are written
    assert sorted(p.name for p in layout.root.iterdir() if p.name.startswith("activations")) == []
    assert sorted(p.name for p in layout.students.iterdir()) == [f"layer_{i:03d}" for i in range(4)]
    trajectory = read_json(layout.trajectory)
    assert len(trajectory["rounds"]) == summary["rounds"] >= 1
    for index in range(len(trajectory["rounds"])):
        assert layout.round(index).is_file()
    for role in ("best", "opt"):
        assert (layout.hybrid(role) / "dtr_export.json").is_file()
        assert (layout.hybrid(role) / "config.json").is_file()
    for name in ("score_vs_linear_layers.png", "distill_normalized_loss.png", "layer_map.png"):
        assert (layout.reports / name).stat().st_size > 1000
    rows = {row["model"]: row for row in summary["rows"]}
    assert rows["M_best"]["linear_layers"] == trajectory["best_layers"]
    assert rows["M_opt"]["linear_layers"] == trajectory["opt_layers"]
    assert rows["teacher"]["num_linear"] == 0 and rows["teacher"]["decode_speedup"] == 1.0
    if rows["M_opt"]["num_linear"]:
        assert rows["M_opt"]["cache_bytes"] < rows["teacher"]["cache_bytes"]
    # the exported M_best scores on validation what the search measured
    assert rows["M_best"]["validation"] == pytest.approx(trajectory["best_score"], abs=1e-9)


def test_mlflow_parent_child_runs_and_metrics(conversion):
    from dtr_core.artifacts import read_json

    params, summary = conversion
    client = mlflow_client(params)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model"] == "tiny-llama"
    assert parent.data.params["distill.steps"] == str(TINY["distill"]["steps"])
    assert parent.data.params["task.name"] == "sentiment"
    metrics = parent.data.metrics
    for name in ("teacher_validation", "teacher_test", "best_validation", "best_test", "opt_validation", "opt_test",
                 "layers_swapped", "opt_kv_cache_reduction", "opt_decode_speedup", "best_prefill_speedup",
                 "round_best_score"):
        assert name in metrics, name
    # 2 workers: blocks of layers 0-1 and 2-3, (2 + 4) teacher layer-forwards per token for 4 layers
    assert metrics["distill.teacher_layer_forwards_per_token"] == 1.5
    history = client.get_metric_history(parent.info.run_id, "round_best_score")
    assert [m.step for m in history] == list(range(summary["rounds"]))

    children = runs_by_kind(client, parent.info.run_id)
    distill_runs = children["distill"]
    assert sorted(int(r.data.params["layer"]) for r in distill_runs) == [0, 1, 2, 3]
    curve = client.get_metric_history(distill_runs[0].info.run_id, "train_loss")
    assert len(curve) >= 2 and curve[-1].step == TINY["distill"]["steps"]
    assert all("normalized_loss" in r.data.metrics and "seconds" in r.data.metrics for r in distill_runs)

    trajectory = read_json(summary["run_dir"] + "/greedy/trajectory.json")
    expected = sorted((r["index"], c["layer"]) for r in trajectory["rounds"] for c in r["candidates"])
    candidate_runs = children["candidate"]
    assert sorted((int(r.data.params["round"]), int(r.data.params["layer"])) for r in candidate_runs) == expected
    for run in candidate_runs:
        assert "round" in run.data.metrics and "layer" in run.data.metrics
        assert ("score" in run.data.metrics) != (run.data.tags["dtr.rejected_early"] == "True")

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert artifacts == {"plots/score_vs_linear_layers.png", "plots/distill_normalized_loss.png", "plots/layer_map.png",
                         "plots/heal_kl.png", "plots/score_vs_linear_layers_healing.png"}  # the fixture heals M_opt
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "greedy")} == {"greedy/trajectory.json"}


def test_registered_models_with_aliases_load_and_predict(conversion):
    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd

    params, summary = conversion
    client = mlflow_client(params)
    name = params.registered_name()
    assert name == "dtr-tiny-llama-sentiment"
    for role in ("best", "opt"):
        version = client.get_model_version_by_alias(name, role)
        assert version.version == summary["registered"][role]["version"]
        assert role in version.tags["dtr.role"].split(",")
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@best")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text"]
    out = model.predict(pd.DataFrame({"text": ["a great film", "dull and far too long"]}))
    assert list(out.columns) == ["label", "confidence"]
    assert set(out["label"]) <= {"positive", "negative"}
    assert ((out["confidence"] >= 0.5) & (out["confidence"] <= 1.0)).all()
    # a model from code: the artifact holds the wrapper's source, no pickled Python object
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@best"))
    assert not list(local.rglob("*.pkl"))
    assert (local / "pyfunc_model.py").is_file()


def test_pyfunc_predictions_match_the_evaluator(conversion):
    """predict classifies exactly as dtr_core.evaluation scores the exported hybrid."""
    import mlflow.pyfunc
    import pandas as pd

    from dtr_core.evaluation import evaluate, get_task
    from dtr_core.models import load_model

    params, summary = conversion
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{params.registered_name()}@opt")
    task = get_task("sentiment")
    examples = task.split("validation")[:8]
    hybrid, tokenizer = load_model(summary["rows"][2]["path"])
    expected = evaluate(hybrid, tokenizer, task, "validation", limit=8).predictions
    out = model.predict(pd.DataFrame({"text": [e.text for e in examples]}))
    assert list(out["label"]) == list(expected)


def test_summary_json_round_trips(conversion):
    params, summary = conversion
    assert json.loads(json.dumps(summary)) == summary


def test_flow_chooses_the_same_layers_as_the_reference_listing(conversion, tmp_path):
    """dtr_core/search/reference.py (plain loops, one full evaluation per candidate) on the same inputs."""
    from transformers import AutoTokenizer

    from dtr_core.artifacts import read_json
    from dtr_core.distill.corpus import Corpus
    from dtr_core.evaluation import get_task
    from dtr_core.models import load_model
    from dtr_core.search.reference import run_reference

    params, summary = conversion
    trajectory = read_json(summary["run_dir"] + "/greedy/trajectory.json")
    teacher, _ = load_model(params.model)
    tokenizer = AutoTokenizer.from_pretrained(summary["rows"][1]["path"])  # the run's own tokenizer
    reference = run_reference(teacher, tokenizer, Corpus(params.distill.corpus, tokenizer),
                              get_task(params.task.name), params.mixer, tmp_path,
                              params.distill.distill_config(params.seed), tolerance=params.tolerance.value,
                              limit=params.task.validation_limit)
    assert trajectory["swap_order"] == reference["swap_order"]
    assert trajectory["best_layers"] == reference["best_layers"]
    assert trajectory["opt_layers"] == reference["opt_layers"]
    assert trajectory["teacher_score"] == reference["teacher_score"]
    assert [r["score"] for r in trajectory["rounds"]] == [r["score"] for r in reference["rounds"]]
    for ours, theirs in zip(trajectory["rounds"], reference["rounds"]):
        scored = {c["layer"]: c["score"] for c in ours["candidates"] if c["score"] is not None}
        assert scored == {layer: theirs["scores"][layer] for layer in scored}


def test_pyfunc_generates_for_language_modelling_tasks(conversion, tmp_path):
    """The same wrapper, given a perplexity task's card, generates a continuation (max_new_tokens)."""
    from types import SimpleNamespace

    import pandas as pd

    from dtr_core.artifacts import write_json
    from dtr_core.evaluation import get_task
    from tasks.pyfunc_model import DtrHybridModel, signature_for, task_card

    params, summary = conversion
    card = task_card(get_task("bbc-lm"))
    assert card == {"name": "bbc-lm", "kind": "language_modeling"}
    write_json(tmp_path / "task.json", card)
    model = DtrHybridModel()
    model.load_context(SimpleNamespace(artifacts={"hybrid": summary["rows"][2]["path"],
                                                  "task": str(tmp_path / "task.json")}))
    out = model.predict(None, pd.DataFrame({"text": ["The economy", "Football"]}), params={"max_new_tokens": 3})
    assert list(out.columns) == ["generated"] and len(out) == 2
    assert all(isinstance(text, str) for text in out["generated"])
    assert [p.name for p in signature_for("language_modeling").params.params] == ["max_new_tokens"]


def test_m_opt_equal_to_m_best_is_one_folder_and_one_registered_version(conversion, tmp_path):
    from mlflow.tracking import MlflowClient

    from dtr_core.run_layout import RunLayout
    from tasks.pyfunc_model import task_card
    from tasks.registry import register_task
    from tasks.runtime import task as build_task
    from tasks.tracking import Tracking

    params, summary = conversion
    best = summary["rows"][1]["path"]
    layout = RunLayout(tmp_path)
    layout.hybrid("opt").mkdir(parents=True)  # what a resumed run may have left there is replaced
    link = str(layout.alias_hybrid("opt", best))
    assert Path(link).is_symlink() and Path(link).resolve() == Path(best).resolve()
    assert (Path(link) / "config.json").is_file()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking.start_parent(uri, "dtr-test", "alias", {"model": "tiny-llama"})
    card = task_card(build_task(params.task))
    registered = register_task.fn(tracking, "dtr-alias", {"best": best, "opt": link}, card, {})
    tracking.finish("FINISHED")
    assert registered["best"]["version"] == registered["opt"]["version"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'dtr-alias'")
    assert len(versions) == 1 and versions[0].tags["dtr.role"] == "best,opt"
    assert {client.get_model_version_by_alias("dtr-alias", role).version for role in ("best", "opt")} == {
        versions[0].version}


def test_healed_m_opt_is_an_extra_model_whose_frozen_weights_are_m_opts(conversion):
    import torch
    from mlflow.tracking import MlflowClient

    from dtr_core.heal.training import student_parameters
    from dtr_core.hybrid.export import read_export_info
    from dtr_core.models import load_model
    from dtr_core.run_layout import RunLayout

    params, summary = conversion
    rows = {row["model"]: row for row in summary["rows"]}
    assert rows["M_opt"]["num_linear"] >= 1, "the tiny conversion must commit a layer for healing to run"
    healed_dir = RunLayout(summary["run_dir"]).hybrid("healed")
    info = read_export_info(healed_dir)
    heal = info["metadata"]["heal"]
    assert heal["status"] == "ok" and heal["steps"] == 8 and info["linear_layers"] == rows["M_opt"]["linear_layers"]
    assert rows["M_healed"]["linear_layers"] == rows["M_opt"]["linear_layers"]
    assert rows["M_healed"]["path"] == str(healed_dir)
    assert (RunLayout(summary["run_dir"]).reports / "heal_kl.png").stat().st_size > 1000
    opt, _ = load_model(rows["M_opt"]["path"])
    healed, _ = load_model(str(healed_dir))
    students = set(student_parameters(opt))
    changed = [name for name, tensor in opt.state_dict().items()
               if not torch.equal(healed.state_dict()[name], tensor)]
    assert changed and set(changed) <= students  # only students moved; every frozen weight is M_opt's

    client = MlflowClient(tracking_uri=params.tracking.tracking_uri, registry_uri=params.tracking.tracking_uri)
    heal_run = {run.info.run_name: run for run in runs_by_kind(client, summary["mlflow"]["run_id"])["heal"]}[
        "heal-healed"]  # (the heal-and-continue test below adds heal-NN runs to this parent)
    assert heal_run.info.status == "FINISHED" and "heal_kl" in heal_run.data.metrics
    parent = client.get_run(summary["mlflow"]["run_id"]).data.metrics
    # (that healing lowers the KL is held in tests/test_heal.py; 8 steps on a tiny model only show the wiring)
    assert (parent["heal_initial_kl"], parent["heal_final_kl"]) == pytest.approx((heal["initial_kl"], heal["final_kl"]))
    assert parent["healed_test"] == rows["M_healed"]["test"]  # after healing, beside before: M_opt's
    assert (parent["opt_validation"], parent["opt_test"]) == (rows["M_opt"]["validation"], rows["M_opt"]["test"])
    version = client.get_model_version_by_alias(params.registered_name(), "healed")
    assert "healed" in version.tags["dtr.role"]


def test_heal_and_continue_flow_matches_the_reference_listing(conversion):
    """The `heal-and-continue` sub-flow (heals and candidates as tasks, resumable folders) and the reference
    listing's step 4 heal the same layers, with the same scores, from the conversion's M_opt."""
    from dtr_core.artifacts import read_json
    from dtr_core.distill.corpus import Corpus
    from dtr_core.heal.students import RECORD
    from dtr_core.models import load_model
    from dtr_core.run_layout import RunLayout
    from dtr_core.search.reference import run_continued_reference
    from flows.heal import SCORE_PLOT, heal_and_continue
    from tasks.tracking import Tracking

    params, summary = conversion
    layout = RunLayout(summary["run_dir"])
    start = read_json(layout.trajectory)["swap_order"][:1]  # one layer: room for the continued rounds
    heal = params.heal.model_copy(update={"every": 1})
    tracking = Tracking(uri=params.tracking.tracking_uri, experiment_id=summary["mlflow"]["experiment_id"],
                        parent_run_id=summary["mlflow"]["run_id"])
    flow_result = heal_and_continue(start_order=start, model=params.model, task=params.task, mixer=params.mixer,
                                    run_dir=summary["run_dir"], heal=heal, tolerance=params.tolerance,
                                    acceptance=params.acceptance, max_layers=params.max_layers, seed=params.seed,
                                    tracking=tracking)
    continued = flow_result["continued"]
    # MLflow: every continued round and heal on the parent run (steps: round index, heal index), a child per heal
    client = mlflow_client(params)
    parent_id = summary["mlflow"]["run_id"]
    rounds = client.get_metric_history(parent_id, "continued_round_best_score")
    assert sorted((m.step, m.value) for m in rounds) == sorted((r["index"], r["score"]) for r in continued["rounds"])
    heal_scores = client.get_metric_history(parent_id, "continued_heal_score")
    assert sorted((m.step, m.value) for m in heal_scores) == sorted((h["index"], h["score"]) for h in continued["heals"])
    heal_runs = {run.info.run_name for run in runs_by_kind(client, parent_id)["heal"]}
    assert {f"heal-{h['index']:02d}" for h in continued["heals"]} <= heal_runs

    model, tokenizer = load_model(params.model)
    tolerance = params.tolerance.build()
    reference = run_continued_reference(model, tokenizer, Corpus(heal.corpus, tokenizer), params.task.build(),
                                        layout.students, start, heal.config(params.seed), heal.every,
                                        tolerance=tolerance.value, tolerance_mode=tolerance.mode,
                                        max_layers=params.max_layers, limit=params.task.validation_limit)
    assert continued["swap_order"] == reference["swap_order"] and continued["stop_reason"] == reference["stop_reason"]
    assert [h["swap_order"] for h in continued["heals"]] == [h["swap_order"] for h in reference["heals"]]
    assert [h["score"] for h in continued["heals"]] == pytest.approx([h["score"] for h in reference["heals"]],
                                                                     abs=1e-9)
    assert [(r["chosen"], r["accepted"], r["heal_index"]) for r in continued["rounds"]] == \
        [(r["chosen"], r["accepted"], r["heal_index"]) for r in reference["rounds"]]
    assert [r["score"] for r in continued["rounds"]] == pytest.approx([r["score"] for r in reference["rounds"]],
                                                                      abs=1e-9)
    assert len(continued["heals"]) >= 2, "the tiny run must continue past M_opt's heal for this test to mean much"
    assert continued["healed_layers"] == reference["healed_layers"]
    assert flow_result["status"] == "ok" and flow_result["eval"]["validation"]["score"] == \
        pytest.approx(reference["healed_score"], abs=1e-9)
    # each heal's folder: its hybrid, the students after it and the rounds scored with them
    for heal_point in continued["heals"]:
        stage = RunLayout(layout.root / "continued" / f"heal_{heal_point['index']:02d}")
        assert read_json(stage.hybrid("healed") / "dtr_export.json")["linear_layers"] == heal_point["layers"]
        assert read_json(stage.students / RECORD)["healed_layers"] == heal_point["layers"]
    for r in continued["rounds"]:
        assert read_json(RunLayout(layout.root / "continued").round(r["index"]))["chosen"] == r["chosen"]
        stage = RunLayout(layout.root / "continued" / f"heal_{r['heal_index']:02d}")
        assert stage.candidate(len(r["committed_before"]), r["chosen"]).is_file()  # candidates: by linear count
    assert read_json(layout.root / "continued" / "trajectory.json")["healed_layers"] == continued["healed_layers"]
    assert (layout.reports / SCORE_PLOT).stat().st_size > 1000


def test_heal_opt_with_heal_every_makes_the_continued_hybrid_the_healed_model(conversion):
    """Step 4b with heal.every > 0: `healed` is the continued search's last healed hybrid (`hybrids/healed`
    links to its heal folder), scored on validation and test."""
    from dtr_core.artifacts import read_json
    from dtr_core.run_layout import RunLayout
    from flows.convert import heal_opt
    from tasks.context import RunContext

    params, summary = conversion
    layout = RunLayout(summary["run_dir"])
    params = params.model_copy(update={"heal": params.heal.model_copy(update={"every": 1})})
    ctx = RunContext(model=params.model, run_dir=summary["run_dir"], mixer=params.mixer)
    start = read_json(layout.trajectory)["swap_order"][:1]  # as the test above: its heals are reused
    paths, evals = {}, {}
    roles = heal_opt(params, ctx, start, paths, evals)
    continued = read_json(layout.root / "continued" / "trajectory.json")
    assert roles == {"healed": continued["healed_layers"]} and len(continued["healed_layers"]) > len(start)
    last = [h for h in continued["heals"] if h["ok"]][-1]
    assert Path(paths["healed"]) == layout.hybrid("healed") and layout.hybrid("healed").is_symlink()
    assert layout.hybrid("healed").resolve() == \
        (layout.root / "continued" / f"heal_{last['index']:02d}" / "hybrids" / "healed").resolve()
    assert read_json(layout.hybrid("healed") / "dtr_export.json")["linear_layers"] == continued["healed_layers"]
    assert evals["healed"]["validation"]["score"] == pytest.approx(continued["healed_score"], abs=1e-9)
    assert "test" in evals["healed"]
