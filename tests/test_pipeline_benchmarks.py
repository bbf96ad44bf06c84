"""The `benchmarks` flow: runs benchmarks like `dtr bench all`, assembles the document, logs reports to MLflow."""

from __future__ import annotations

import typing

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_names_offered_are_the_benchmarks():
    from benchmarks.harness import BY_NAME
    from flows.benchmarks import BenchName

    assert list(typing.get_args(BenchName)) == list(BY_NAME)


def test_flow_runs_a_benchmark_and_logs_its_report(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.benchmarks import EXPERIMENT, benchmarks
    from tasks.params import TrackingParams

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = benchmarks(names=["mixers"], quick=False, extra={"mixers": "--tiny --threads 1"},
                         out_root=str(tmp_path / "bench"), doc=str(tmp_path / "BENCHMARKS.md"),
                         logs=str(tmp_path / "logs"), tracking=TrackingParams(tracking_uri=uri, experiment=EXPERIMENT))
    assert records["mixers"]["status"] == "ok"
    assert (tmp_path / "bench" / "mixers" / "mixers.json").is_file()
    document = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Linear-attention ops vs softmax attention (CPU)" in document and "--extra 'mixers=--tiny --threads 1'" in document

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dtr.bench.mixers"] == "ok"
    assert run.data.metrics["mixers_minutes"] > 0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "mixers")}
    assert logged == {"mixers/mixers.json", "mixers/mixers.md"}
    assert "BENCHMARKS.md" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_extra_arguments_for_a_benchmark_not_run_are_refused_before_any_work(tmp_path):
    from flows.benchmarks import benchmarks
    from tasks.params import TrackingParams

    with pytest.raises(ValueError, match=r"extra arguments for benchmarks that are not run: \['search'\]"):
        benchmarks(names=["mixers"], extra={"search": "--limit 8"}, out_root=str(tmp_path / "bench"),
                   tracking=TrackingParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert not (tmp_path / "bench").exists() and not (tmp_path / "mlflow.db").exists()
