"""What a user meets in the Prefect and MLflow UIs after one tiny conversion (the session's Prefect test server,
a sqlite MLflow store): task runs the default UI can list, readable run names, artifacts updated in place,
the model-training experiment view, child runs timed by their work, and registry versions that say what
they are; then promotion on improvement only (`tracking.promote = "if-better"`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.pipeline_support import mlflow_client, runs_by_kind, tiny_params

pytestmark = pytest.mark.usefixtures("prefect_harness", "one_torch_thread")


def _api(method: str, path: str, body=None):
    from prefect.settings import PREFECT_API_URL

    from dtr.commands.ui import _api as call

    return call(PREFECT_API_URL.value().rstrip("/"), method, path, body)


@pytest.fixture(scope="module")
def conversion(tmp_path_factory, prefect_harness):
    from flows.convert import run_convert
    from tasks import runtime

    tmp_path = tmp_path_factory.mktemp("ui")
    params = tiny_params(tmp_path)
    runtime.clear()
    summary = run_convert(params)
    runtime.clear()
    flow_run_id = mlflow_client(params).get_run(summary["mlflow"]["run_id"]).data.tags["prefect.flow_run_id"]
    return params, summary, flow_run_id


def _task_runs(flow_run_id: str) -> list[dict]:
    return _api("POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})


def _sub_flow_runs(flow_run_id: str) -> list[dict]:
    return _api("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})


def test_the_parent_run_lists_its_tasks_without_flow_run_inputs(conversion):
    """The default UI cannot show a task run whose inputs include a sub-flow run (PrefectHQ/prefect#18680)."""
    _, _, flow_run_id = conversion
    task_runs = _task_runs(flow_run_id)
    names = {run["name"] for run in task_runs}
    assert {"evaluate-teacher", "export-best", "evaluate-best"} <= names, names
    assert {"plots", "register-models", "publish-summary"} <= {name.rsplit("-", 1)[0] for name in names}, names
    flow_run_inputs = {(run["name"], name) for run in task_runs for name, inputs in run["task_inputs"].items()
                       for item in inputs if item["input_type"] == "flow_run"}
    assert flow_run_inputs == set()
    for sub in _sub_flow_runs(flow_run_id):
        bad = {(run["name"], name) for run in _task_runs(sub["id"]) for name, inputs in run["task_inputs"].items()
               for item in inputs if item["input_type"] == "flow_run"}
        assert bad == set(), sub["name"]


def test_runs_are_named_after_stage_model_and_task(conversion):
    _, _, flow_run_id = conversion
    parent = _api("GET", f"/flow_runs/{flow_run_id}")
    assert parent["name"] == "convert-tiny-llama-sentiment"
    names = sorted(run["name"] for run in _sub_flow_runs(flow_run_id))
    assert names[1:] == ["distill-tiny-llama", "replace-tiny-llama-sentiment"], names
    assert names[0] in ("benchmark-teacher+m-best", "benchmark-teacher+m-best+m-opt"), names


def test_greedy_table_is_one_artifact_updated_in_place(conversion):
    import json

    _, summary, flow_run_id = conversion
    replace_run = next(run for run in _sub_flow_runs(flow_run_id) if run["name"].startswith("replace"))
    tables = [a for a in _api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [replace_run["id"]]}}})
              if a["type"] == "table"]
    assert len(tables) == 1, [a["key"] for a in tables]
    rows = json.loads(tables[0]["data"])
    assert [row["round"] for row in rows] == list(range(summary["rounds"]))
    parent = _api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    (markdown,) = [a for a in parent if a["type"] == "markdown"]
    assert summary["mlflow"]["run_id"] in markdown["data"]
    for info in summary["registered"].values():
        assert info["registered_uri"] in markdown["data"]


def test_summary_links_point_at_the_mlflow_server_only():
    from tasks.report import summary_links

    summary = {"run_id": "tiny-run", "mlflow": {"url": "http://127.0.0.1:5000/#/experiments/1/runs/abc"},
               "registered": {"best": {"version": "3", "registered_uri": "models:/dtr-x@best",
                                       "url": "http://127.0.0.1:5000/#/models/dtr-x/versions/3"}}}
    links = summary_links(summary)
    assert [link["link"] for link in links] == [summary["mlflow"]["url"], summary["registered"]["best"]["url"]]
    assert all(link["key"].islower() and " " not in link["key"] for link in links)
    sqlite = {**summary, "mlflow": {"url": "mlflow ui --backend-store-uri sqlite:///x.db  (run abc)"},
              "registered": {"best": {**summary["registered"]["best"], "url": None}}}
    assert summary_links(sqlite) == []


def test_experiment_opens_in_the_model_training_view(conversion):
    from tasks.tracking import EXPERIMENT_KIND_TAG

    params, summary, _ = conversion
    experiment = mlflow_client(params).get_experiment(summary["mlflow"]["experiment_id"])
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_child_runs_span_the_seconds_of_their_work(conversion):
    params, summary, _ = conversion
    children = runs_by_kind(mlflow_client(params), summary["mlflow"]["run_id"])
    for run in children["distill"] + children["candidate"]:
        work = run.data.metrics["seconds"]
        span = (run.info.end_time - run.info.start_time) / 1000
        assert abs(span - work) < 0.01 + 0.002 * work, (run.info.run_name, span, work)
    assert max(run.data.metrics["seconds"] for run in children["distill"]) > 0.1  # real work, not a stamp


def test_registered_versions_say_what_they_are(conversion):
    from tasks.registry import TEST_SET_TAG, describe_test_set

    params, summary, _ = conversion
    client = mlflow_client(params)
    row = {r["model"]: r for r in summary["rows"]}["M_best"]
    version = client.get_model_version(params.registered_name(), summary["registered"]["best"]["version"])
    assert version.tags[TEST_SET_TAG] == describe_test_set(params.task) == "sentiment test[:16] #" + \
        describe_test_set(params.task).rsplit("#", 1)[1]
    assert version.tags["dtr.test"] == f"{row['test']:.4f}"
    assert version.tags["dtr.linear_layers"] == (",".join(map(str, row["linear_layers"])) or "none")
    assert version.tags["dtr.decode_speedup"] == f"{row['decode_speedup']:.2f}"
    for text in (f"{row['num_linear']} of {summary['num_layers']} layers linear", describe_test_set(params.task),
                 "decode", "KV cache"):
        assert text in version.description


def _perturbed_copy(folder: str, to: Path, delta: float) -> str:
    """The hybrid with one weight moved by `delta`: other weights, so a new version."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to, symlinks=False)
    path = sorted(to.glob("model*.safetensors"))[0]
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] + delta
    save_file(tensors, path, metadata={"format": "pt"})
    return str(to)


def test_if_better_keeps_the_alias_unless_the_same_test_set_scores_higher(conversion, tmp_path):
    from tasks.pyfunc_model import task_card
    from tasks.registry import TEST_SET_TAG, TEST_TAG, register_task
    from tasks.runtime import task as build_task
    from tasks.tracking import Tracking

    params, summary, _ = conversion
    client = mlflow_client(params)
    name = params.registered_name()
    first = client.get_model_version_by_alias(name, "best")
    card = task_card(build_task(params.task))
    tracking = Tracking.start_parent(params.tracking.tracking_uri, params.tracking.experiment, "promote", {})

    def register(folder: str, test: float, test_set: str, promote: str) -> dict:
        tags = {TEST_TAG: f"{test:.4f}", TEST_SET_TAG: test_set}
        return register_task.fn(tracking, name, {"best": folder}, card, {"best": "copy"}, {"best": tags}, promote)["best"]

    same_set, score = first.tags[TEST_SET_TAG], float(first.tags[TEST_TAG])
    other = Path(summary["rows"][1]["path"])
    worse = register(_perturbed_copy(str(other), tmp_path / "worse", 1e-3), score - 0.1, same_set, "if-better")
    assert not worse["promoted"] and "not beaten" in worse["reason"] and worse["version"] != first.version
    elsewhere = register(_perturbed_copy(str(other), tmp_path / "elsewhere", 2e-3), score + 0.5, "sentiment test[:99] #x",
                         "if-better")
    assert not elsewhere["promoted"] and "different test sets" in elsewhere["reason"]
    assert client.get_model_version_by_alias(name, "best").version == first.version
    assert "dtr.role" not in client.get_model_version(name, worse["version"]).tags
    better = register(_perturbed_copy(str(other), tmp_path / "better", 3e-3), score + 0.1, same_set, "if-better")
    assert better["promoted"] and client.get_model_version_by_alias(name, "best").version == better["version"]
    assert "best" not in client.get_model_version(name, first.version).tags.get("dtr.role", "").split(",")
    latest = register(str(tmp_path / "worse"), 0.0, same_set, "latest")  # the same weights: no new version
    assert latest["version"] == worse["version"] and latest["promoted"]
    assert client.get_model_version_by_alias(name, "best").version == worse["version"]
    tracking.finish("FINISHED")


def test_a_quoted_sub_flow_result_is_no_flow_run_input():
    """Why flows/convert.py quotes sub-flow results: unquoted, Prefect records a `flow_run` task input."""
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect.utilities.annotations import quote

    @flow
    def sub() -> dict:
        return {"best_layers": [1, 2]}

    @task
    def use(value: dict) -> int:
        return len(value["best_layers"])

    @flow
    def top(quoted: bool) -> tuple[str, int]:
        result = sub()
        return str(FlowRunContext.get().flow_run.id), use(quote(result) if quoted else result)

    for quoted in (False, True):
        flow_run_id, length = top(quoted)
        assert length == 2  # the task gets the value itself
        (use_run,) = [run for run in _task_runs(flow_run_id) if run["name"].startswith("use")]
        types = {item["input_type"] for inputs in use_run["task_inputs"].values() for item in inputs}
        assert types == (set() if quoted else {"flow_run"})
