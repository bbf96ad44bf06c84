"""Parameters of the dtr flows: pydantic models, so the Prefect UI renders a typed form (descriptions,
dropdowns for `Literal`s) and bad values are rejected before any work.

`ConvertParams` is everything a conversion depends on; `PROFILES` are named starting points (`default`:
SmolLM2-135M on `sentiment` within ~20 minutes on 2 CPU cores; `smoke`: the same path on a tiny random
model in well under two minutes, used by tests). `check_params` runs the checks pydantic cannot (is the
model source there, does the task build, is the corpus readable) and raises `ValueError` with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MixerName = Literal["gated_deltanet", "gla", "jetblock"]  # = sorted(dtr_core.mixers.MIXERS) (tested)
RunnerKind = Literal["threads", "processes", "dask"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskParams(_Params):
    """Which task the hybrid is built for: a built-in name, or your own data file + template."""

    name: str = Field("sentiment", description="Built-in task (sentiment, trec, bbc-topic, bbc-lm) or a task "
                      "spec .json file. Ignored when data_file is set.")
    data_file: str | None = Field(None, description="Your own examples: a .csv, .jsonl or .parquet file. "
                                  "Makes a classification task (label_column) or a perplexity task (no label).")
    text_column: str = Field("text", description="data_file: column holding the text")
    label_column: str | None = Field("label", description="data_file: column holding the label; empty for a "
                                     "perplexity (language-modelling) task")
    template: str = Field("{text}\nAnswer:", description="data_file: prompt template with {text}; the model "
                          "scores each verbaliser as the continuation")
    verbalisers: dict[str, str] = Field(default_factory=dict, description="data_file: label -> continuation, "
                                        "e.g. {\"pos\": \" positive\", \"neg\": \" negative\"}")
    validation_limit: int | None = Field(None, ge=1, description="Search on the first N validation examples "
                                         "only (None: the whole validation split)")
    test_limit: int | None = Field(None, ge=1, description="Report on the first N test examples only "
                                   "(None: the whole test split)")

    def build(self):
        """The `dtr_core.evaluation.Task` (reads the data; raises ValueError on problems)."""
        from dtr_core.evaluation import TaskSpec, get_task

        if self.data_file is None:
            return get_task(self.name)
        return get_task(TaskSpec(path=self.data_file, text_column=self.text_column,
                                 label_column=self.label_column or None, template=self.template,
                                 verbalisers=dict(self.verbalisers)))

    @property
    def label(self) -> str:
        """Short name used in run ids and the registered model name."""
        return Path(self.data_file).stem if self.data_file else Path(self.name).stem


class DistillBudget(_Params):
    """Phase 1 budget: how many teacher tokens to capture and how long to train each layer's student."""

    corpus: str = Field("bbc", description="Distillation text: 'bbc' (built in), a .txt/.jsonl/.parquet/.csv "
                        "file or folder, or hf:<dataset>[:<config>]:<split>")
    tokens: int = Field(8192, ge=16, description="Teacher tokens captured for distillation (all layers share them)")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per captured sequence")
    steps: int = Field(30, ge=1, description="Optimiser steps per layer")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW peak learning rate (warm-up 10% of steps, cosine decay)")
    batch_size: int = Field(4, ge=1, description="Sequences per optimiser step")

    @model_validator(mode="after")
    def _two_sequences(self) -> DistillBudget:
        if self.tokens // self.seq_len < 2:
            raise ValueError(f"tokens ({self.tokens}) must hold at least 2 sequences of seq_len {self.seq_len} "
                             "(one to train on, one held out)")
        return self

    def distill_config(self, seed: int):
        from dtr_core.distill import DistillConfig

        return DistillConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=seed,
                             warmup_steps=max(1, round(0.1 * self.steps)),  # the module's 10% warm-up
                             log_every=max(1, min(10, self.steps // 10)))


class ToleranceParams(_Params):
    """How far below the teacher's validation score the search may go (P_min)."""

    mode: Literal["relative", "absolute"] = Field("relative", description="relative: P_min = P_base - value x "
                                                  "|P_base| (paper: 5%); absolute: P_min = value")
    value: float = Field(0.05, description="The tolerance (relative: a fraction in [0, 1)) or the absolute P_min")

    def build(self):
        from dtr_core.acceptance import Tolerance

        return Tolerance(mode=self.mode, value=self.value)


class AcceptanceParams(_Params):
    """When the best candidate of a round is committed."""

    mode: Literal["point", "bootstrap"] = Field("point", description="point: score >= P_min (the paper); "
                                                "bootstrap: paired-bootstrap lower confidence bound >= P_min")
    confidence: float = Field(0.95, gt=0, lt=1, description="bootstrap: one-sided confidence of the bound")
    resamples: int = Field(2000, ge=1, description="bootstrap: number of resamples")

    def build(self, seed: int):
        from dtr_core.acceptance import Acceptance

        return Acceptance(mode=self.mode, n_resamples=self.resamples, confidence=self.confidence, seed=seed)


class RunnerParams(_Params):
    """Where the per-layer and per-candidate tasks run."""

    kind: RunnerKind = Field("threads", description="threads (default, one process), processes (a local "
                             "process pool) or dask (a local Dask cluster, or dask_address)")
    workers: int = Field(2, ge=1, le=64, description="Parallel tasks (threads, processes or Dask workers); each "
                         "uses one torch thread while tasks run in parallel")
    dask_address: str | None = Field(None, description="dask: scheduler address of an existing cluster "
                                     "(e.g. tcp://127.0.0.1:8786); None starts a LocalCluster on 127.0.0.1")


class SpeedParams(_Params):
    """The speed benchmark of teacher, M_best and M_opt."""

    context_len: int = Field(2048, ge=1, description="Prompt length for prefill latency, decode rate and cache size")
    decode_tokens: int = Field(32, ge=1, description="Tokens decoded after the prompt")
    repeats: int = Field(1, ge=1, le=20, description="Measurements per model (the median is reported)")


class TrackingParams(_Params):
    """MLflow tracking and model registry."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///mlflow.db in the working directory")
    experiment: str = Field("dtr", description="MLflow experiment name")
    register_models: bool = Field(True, description="Register M_best and M_opt (aliases best, opt) when the run "
                                  "succeeds")
    model_name: str | None = Field(None, description="Registered model name; None: dtr-<model>-<task>")


class ConvertParams(_Params):
    """Everything a conversion depends on (the flow `convert` takes these fields as its parameters)."""

    model: str = Field("smollm2-135m", description="Teacher: built-in name (smollm2-135m, tiny-llama, tiny-qwen3, "
                       "...), a save_pretrained folder, or a hub id")
    task: TaskParams = Field(default_factory=TaskParams)
    mixer: MixerName = Field("gated_deltanet", description="Linear-attention student type")
    distill: DistillBudget = Field(default_factory=DistillBudget)
    tolerance: ToleranceParams = Field(default_factory=ToleranceParams)
    acceptance: AcceptanceParams = Field(default_factory=AcceptanceParams)
    max_layers: int | None = Field(None, ge=0, description="Stop the search after this many linear layers "
                                   "(None: until a round is rejected or every layer is linear)")
    seed: int = Field(0, ge=0, description="Seed of distillation and bootstrap")
    runner: RunnerParams = Field(default_factory=RunnerParams)
    speed: SpeedParams = Field(default_factory=SpeedParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    output_dir: str = Field("runs", description="Where run folders go (runs/<run_id>/...)")
    run_id: str | None = Field(None, description="Run folder name; None: derived from the parameters, so the "
                               "same parameters resume the same run")

    def result_dict(self) -> dict[str, Any]:
        """The parameters that decide the result (what the run id hashes): not where or how it runs."""
        return self.model_dump(mode="json", exclude={"runner", "tracking", "output_dir", "run_id", "speed"})

    def resolved_run_id(self) -> str:
        from dtr_core.artifacts import hash_json
        from dtr_core.conversion import slug

        if self.run_id:
            return self.run_id
        return f"{slug(self.model, 24)}-{slug(self.task.label, 24)}-{hash_json(self.result_dict())[:10]}"

    def registered_name(self) -> str:
        from dtr_core.conversion import slug

        return self.tracking.model_name or f"dtr-{slug(self.model, 40)}-{slug(self.task.label, 40)}"


PROFILES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M (30 layers) on 2 CPU cores in <= 20 min: ~8k distillation tokens, 30 steps per layer,
    # 100 validation examples for the search, up to 4 linear layers (the paper's best hybrids swap ~3.8).
    "default": {
        "model": "smollm2-135m",
        "task": {"name": "sentiment", "validation_limit": 100, "test_limit": 300},
        # a short, hot schedule: on layer 15, 30 steps at lr 3e-3 reached a normalised loss of 0.71
        "distill": {"tokens": 8192, "seq_len": 256, "steps": 40, "lr": 3e-3},
        "max_layers": 4,
        "speed": {"context_len": 2048, "decode_tokens": 32, "repeats": 3},  # median of 3: shared machines are noisy
    },
    # The same path on a 4-layer random model: seconds per stage.
    "smoke": {
        "model": "tiny-llama",
        "task": {"name": "sentiment", "validation_limit": 24, "test_limit": 24},
        "distill": {"tokens": 1024, "seq_len": 64, "steps": 8},
        "max_layers": None,
        "speed": {"context_len": 256, "decode_tokens": 8},
    },
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: `distill.steps: Input should be greater than or equal to 1`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "parameters"
        parts.append(f"{where}: {item['msg']}" + (f" (got {item['input']!r})" if "input" in item and
                                                     not isinstance(item["input"], dict) else ""))
    return "invalid parameters: " + "; ".join(parts)


def build_params(profile: str = "default", **overrides: Any) -> ConvertParams:
    """`ConvertParams` from a profile plus overrides (nested dicts merge). Raises a one-line ValueError."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    values = _merge(PROFILES[profile], {k: v for k, v in overrides.items() if v is not None})
    try:
        return ConvertParams.model_validate(values)
    except ValidationError as error:
        raise ValueError(one_line(error)) from None


def check_params(params: ConvertParams) -> None:
    """Checks pydantic cannot do: model source, task data, corpus, runner address. One-line ValueError.

    Cheap: nothing is loaded except the task's data (which the search needs anyway).
    """
    from dtr_core.corpus import load_corpus
    from dtr_core.models import BUILTIN_MODELS, resolve_source

    if params.model not in BUILTIN_MODELS:
        resolve_source(params.model)  # FileNotFoundError / ValueError naming the fix
    task = params.task.build()
    task.split("validation")
    task.split("test")
    if params.task.data_file is None and params.task.name not in _builtin_tasks() \
            and not params.task.name.endswith(".json"):
        raise ValueError(f"unknown task '{params.task.name}'")
    if params.distill.corpus != "bbc" and not params.distill.corpus.startswith("hf:") \
            and not Path(params.distill.corpus).expanduser().exists():
        raise ValueError(f"distillation corpus {params.distill.corpus!r} does not exist; use 'bbc', a file or folder, "
                         "or hf:<dataset>[:<config>]:<split>")
    if params.distill.corpus != "bbc":
        load_corpus(params.distill.corpus)
    params.tolerance.build()
    params.acceptance.build(params.seed)
    if params.runner.dask_address is not None and params.runner.kind != "dask":
        raise ValueError(f"runner.dask_address is set but runner.kind is '{params.runner.kind}'; use kind 'dask'")
    from tasks.tracking import check_tracking_uri, resolve_tracking_uri

    check_tracking_uri(resolve_tracking_uri(params.tracking.tracking_uri))


def _builtin_tasks() -> set[str]:
    from dtr_core.evaluation import TASKS

    return set(TASKS)
