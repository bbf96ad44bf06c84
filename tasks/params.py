"""Parameters of the dtr flows: pydantic models, so the Prefect UI renders a typed form (descriptions,
dropdowns for `Literal`s) and bad values are rejected before any work.

They live in `tasks/` so the tasks take them typed; `flows/` and the CLI import them from here.

`ConvertParams` is everything a conversion depends on, and its defaults are the only place a pipeline
default is written: SmolLM2-135M on `sentiment` within ~20 minutes on 2 CPU cores (the `default` profile,
the Prefect form, `dtr convert` without options and the `convert` deployment are all this run). The
distillation budget's defaults come from `dtr_core.distill.config`, which the benchmarks share. Named
profiles list only what differs (`smoke`: the same path on a tiny random model in well under two minutes,
used by tests).

Two stages of checks, both before any work and both writing nothing:
- parse time (pydantic, microseconds): types and ranges, the run id (a plain folder name inside
  `output_dir`), the registered model name (MLflow's own rules), `max_layers >= 1`;
- `check_params` (seconds): everything that needs the file system or the network: the model source
  (`dtr_core.preflight`), the task data, the corpus, the output folder and its free disk, the tracking store
  and the Dask scheduler (`tasks.checks`). Each problem is a `ValueError` with one line.
  `check_params_once` runs it once per process for the same parameters: the CLI checks before Prefect
  starts, and the flow, which checks when started another way (UI, deployment), then does not repeat it.
"""

from __future__ import annotations

import posixpath
import re
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtr_core.distill.config import (CORPUS, RANDOM_TEACHER_MAX_NORMALIZED_LOSS, SEQ_LEN, TOKENS, DistillConfig,
                                     check_seq_lens)
from dtr_core.evaluation.registry import task_list
from dtr_core.heal.config import HealConfig

MixerName = Literal["gated_deltanet", "gla", "jetblock"]  # = sorted(dtr_core.mixers.MIXERS) (tested)
# = list(dtr_core.models.BUILTIN_MODELS), sorted(dtr_core.evaluation.TASKS) (tested)
BuiltinModel = Literal["smollm2-135m", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "smollm2-135m-random"]
BuiltinTask = Literal["bbc-lm", "bbc-topic", "sentiment", "trec"]
# A built-in name or any other text (a folder, a hub id, a spec file): the Prefect form offers a dropdown of
# the built-in names beside a text box (JSON schema anyOf); validation accepts any text.
ModelSource = Annotated[BuiltinModel, Field(title="built-in model")] | Annotated[str, Field(
    title="folder or hub id")]
TaskSource = Annotated[BuiltinTask, Field(title="built-in task")] | Annotated[str, Field(title="task spec .json file")]
RunnerKind = Literal["threads", "processes", "dask"]

# A run id names one folder inside output_dir: no separators, no "..", no leading dot or dash.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MODEL_NAME_MAX_LENGTH = 256  # the registry's name column (mlflow/store/model_registry/dbmodels/models.py)


def check_registered_model_name(name: str) -> None:
    """The rules of MLflow 3.17's model registry (`mlflow.utils.validation._validate_model_name` and the
    file store's extra ones), without importing mlflow; a test compares the two. One-line ValueError."""
    if not name.strip():
        raise ValueError("a registered model name must not be empty")
    bad = [c for c in "/:%" if c in name]
    if bad:
        raise ValueError(f"a registered model name cannot contain {', '.join(repr(c) for c in bad)}; got {name!r}")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise ValueError(f"registered model name {name!r} would resolve to {norm!r} as a path; MLflow refuses it")
    if len(name) > MODEL_NAME_MAX_LENGTH:
        raise ValueError(f"a registered model name has at most {MODEL_NAME_MAX_LENGTH} characters, got {len(name)}")


def run_folder(output_dir: str, run_id: str) -> Path:
    """`output_dir/run_id`, resolved (symlinks followed); ValueError when it lies outside output_dir."""
    root = Path(output_dir).expanduser().resolve()
    folder = (root / run_id).resolve()
    if folder.parent != root:
        raise ValueError(f"run folder {root / run_id} resolves to {folder}, outside output_dir {root}; choose "
                         "another --run-id")
    return folder


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskParams(_Params):
    """Which task the hybrid is built for: a built-in name, or your own data file + template."""

    name: TaskSource = Field("sentiment", description=f"Built-in task: {task_list()}; or a task "
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
    # 100 validation examples keep a SmolLM2-135M search round of ~30 candidates within minutes on 2 cores
    validation_limit: int | None = Field(100, ge=1, description="Search on the first N validation examples "
                                         "only (None: the whole validation split)")
    test_limit: int | None = Field(300, ge=1, description="Report on the first N test examples only "
                                   "(None: the whole test split)")
    metric: str | None = Field(None, description="The score the search keeps: accuracy, macro_f1, "
                               "balanced_accuracy or recall:CLASS for a classification task, perplexity for a "
                               "perplexity task. None: the task's own (accuracy / perplexity)")
    verbaliser_scoring: str | None = Field(None, description="How label continuations are compared: sum, per_token "
                                           "(log-likelihood per token, acc_norm) or per_byte. None: sum, or "
                                           "per_token when the verbalisers differ in token length")
    reference_columns: list[str] | None = Field(None, description="data_file: the column(s) holding reference "
                                                "answers; makes a generative task (the model answers the template "
                                                "by greedy generation; metrics exact_match, f1, rouge_l, regex_match)")
    max_new_tokens: int = Field(32, ge=1, description="generative data_file: most tokens generated per answer")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="generative data_file: strings that end "
                            "an answer (cut from it)")
    answer_regex: str | None = Field(None, description="generative data_file: regex whose first group is the "
                                     "answer, for metric regex_match (e.g. '#### (-?[0-9.,]+)')")

    def build(self):
        """The `dtr_core.evaluation.Task` (reads the data; raises ValueError on problems)."""
        from dtr_core.evaluation import TaskSpec, get_task, with_options

        if self.data_file is None:
            return with_options(get_task(self.name), self.metric, self.verbaliser_scoring)
        generative = {} if self.reference_columns is None else dict(
            reference_columns=tuple(self.reference_columns), max_new_tokens=self.max_new_tokens,
            stop=tuple(self.stop), answer_regex=self.answer_regex)
        return get_task(TaskSpec(path=self.data_file, text_column=self.text_column,
                                 label_column=self.label_column or None, template=self.template,
                                 verbalisers=dict(self.verbalisers), metric=self.metric,
                                 verbaliser_scoring=self.verbaliser_scoring, **generative))

    @property
    def label(self) -> str:
        """Short name used in run ids and the registered model name."""
        return Path(self.data_file).stem if self.data_file else Path(self.name).stem


class DistillBudget(_Params):
    """Phase 1 budget: the corpus the teacher streams, how many tokens each layer's student trains on, and how
    the layers are grouped into tasks (a block of consecutive layers shares one teacher forward per step)."""

    corpus: str = Field(CORPUS, description="Distillation text: 'bbc' (built in), a .txt/.jsonl/.parquet/.csv "
                        "file or folder, or hf:DATASET[:CONFIG]:SPLIT")
    tokens: int = Field(TOKENS, ge=1, description="Training tokens per layer, streamed from the corpus (repeated "
                        "when it is shorter); disk and memory do not grow with it (1e8 is fine)")
    seq_len: int | list[int] = Field(SEQ_LEN, description="Tokens per training sequence, or a mix of lengths "
                                     "taken in turn step by step (e.g. 256,1024), each step batch_size x the "
                                     "first length tokens")
    steps: int | None = Field(None, ge=1, description="Optimiser steps per layer; None: tokens / (batch_size x "
                              "seq_len) (given, it overrides tokens)")
    lr: float = Field(DistillConfig.lr, gt=0, le=1.0, description="AdamW peak learning rate (warm-up 10% of steps, cosine decay)")
    batch_size: int = Field(DistillConfig.batch_size, ge=1, description="Sequences of the first seq_len per optimiser step")
    eval_sequences: int = Field(DistillConfig.eval_sequences, ge=1, description="Sequences at the start of the "
                                "stream held out for the normalised loss (never trained on)")
    layers_per_task: int | None = Field(None, ge=1, description="Consecutive layers distilled together by one "
                                        "task (one teacher forward per step for all); None: layers / workers")
    checkpoint_every_steps: int = Field(DistillConfig.checkpoint_every_steps, ge=1, description="A block of "
                                        "layers checkpoints its training every this many steps (or minutes, "
                                        "whichever comes first); a killed run resumes from there")
    checkpoint_every_minutes: float = Field(DistillConfig.checkpoint_every_minutes, gt=0, allow_inf_nan=False,
                                            description="A block of layers checkpoints its training every "
                                            "this many minutes (or steps, whichever comes first)")
    max_normalized_loss: float = Field(DistillConfig.max_normalized_loss, gt=0, allow_inf_nan=False, description="A student whose held-out "
                                       "normalised loss (MSE / variance of the teacher's output; 1.0 = no better "
                                       "than predicting the mean) is at or above this is marked failed and never "
                                       "offered to the search")

    @field_validator("tokens", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """Accept 1e8 (a float or the text "1e8") when it is a whole number."""
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                return value  # pydantic names the problem
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("seq_len", mode="before")
    @classmethod
    def _lengths(cls, value: Any) -> Any:
        """"256,1024" (the CLI) is the list [256, 1024]; one length stays an int."""
        if isinstance(value, str) and "," in value:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("seq_len")
    @classmethod
    def _positive_lengths(cls, value: int | list[int]) -> int | list[int]:
        lengths = value if isinstance(value, list) else [value]
        if not lengths or any(n < 1 for n in lengths):
            raise ValueError(f"sequence lengths must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _at_least_one_step(self) -> DistillBudget:
        step = self.batch_size * self.seq_lens[0]
        if self.steps is None and self.tokens < step:
            raise ValueError(f"tokens ({self.tokens}) is less than one optimiser step of batch_size x seq_len = "
                             f"{self.batch_size} x {self.seq_lens[0]} = {step} tokens; give at least {step}, or a "
                             "smaller batch size or sequence length")
        return self

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(self.seq_len) if isinstance(self.seq_len, list) else (self.seq_len,)

    def distill_config(self, seed: int) -> DistillConfig:
        return DistillConfig.for_tokens(self.tokens, self.steps, batch_size=self.batch_size, seq_lens=self.seq_lens,
                                        eval_sequences=self.eval_sequences, lr=self.lr, seed=seed,
                                        max_normalized_loss=self.max_normalized_loss,
                                        checkpoint_every_steps=self.checkpoint_every_steps,
                                        checkpoint_every_minutes=self.checkpoint_every_minutes)


class ToleranceParams(_Params):
    """How far below the teacher's validation score the search may go (P_min)."""

    mode: Literal["relative", "absolute"] = Field("relative", description="relative: P_min = P_base - value x "
                                                  "|P_base| (paper: 5%); absolute: P_min = value")
    value: float = Field(0.05, description="The tolerance (relative: a fraction in [0, 1)) or the absolute P_min")

    def build(self):
        from dtr_core.search.acceptance import Tolerance

        return Tolerance(mode=self.mode, value=self.value)


class AcceptanceParams(_Params):
    """When the best candidate of a round is committed."""

    mode: Literal["point", "bootstrap"] = Field("point", description="point: score >= P_min (the paper); "
                                                "bootstrap: paired-bootstrap lower confidence bound >= P_min")
    confidence: float = Field(0.95, gt=0, lt=1, description="bootstrap: one-sided confidence of the bound")
    resamples: int = Field(2000, ge=1, description="bootstrap: number of resamples")

    def build(self, seed: int):
        from dtr_core.search.acceptance import Acceptance

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
    long_context_len: int | None = Field(32768, ge=1, description="Also decode from a synthetic cache of this many "
                                         "tokens (seconds, not a real prefill): where a hybrid's gain shows. "
                                         "None: skip")
    # median of 3: shared machines are noisy
    repeats: int = Field(3, ge=1, le=20, description="Measurements per model (the median is reported)")


class TrackingParams(_Params):
    """MLflow tracking and model registry."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///mlflow.db in the working directory")
    experiment: str = Field("dtr", description="MLflow experiment name")
    register_models: bool = Field(True, description="Register M_best and M_opt (aliases best, opt) when the run "
                                  "succeeds")
    model_name: str | None = Field(None, description="Registered model name; None: dtr-MODEL-TASK")
    promote: Literal["latest", "if-better"] = Field("latest", description="Where the aliases best and opt go: "
                                                    "latest: to this conversion's models; if-better: only when "
                                                    "their test score beats the aliased version's on the same "
                                                    "test set (else the alias stays and the log says why)")

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        if value is not None:
            check_registered_model_name(value)
        return value


class HealParams(_Params):
    """The heal stage after the search: the M_opt hybrid trained end to end towards the teacher (an extra model,
    `hybrids/healed`, alias `healed`)."""

    enabled: bool = Field(False, description="Heal M_opt after the search (KL to the teacher's next-token "
                          "distribution; the students train, every other weight stays as it is)")
    corpus: str = Field(CORPUS, description="Healing text: the same sources as distill.corpus")
    steps: int = Field(HealConfig.steps, ge=1, description="Optimiser steps")
    batch_size: int = Field(HealConfig.batch_size, ge=1, description="Sequences per step")
    seq_len: int = Field(HealConfig.seq_len, ge=2, le=8192, description="Tokens per sequence")
    lr: float = Field(HealConfig.lr, gt=0, le=1.0, description="AdamW peak learning rate (warm-up 10% of "
                      "steps, cosine decay)")
    every: int = Field(HealConfig.every, ge=0, description="Heal-then-continue: after healing M_opt, search on from "
                       "the healed hybrid and heal again after every N committed layers; the last healed hybrid is "
                       "`healed` (0: heal M_opt once; needs enabled)")

    lora_rank: int = Field(HealConfig.lora_rank, ge=0, le=1024, description="LoRA adapters (through peft) of this "
                           "rank on the frozen full-attention and MLP projections, trained with the students and "
                           "merged into the healed hybrid (0: the students alone train)")

    task_lm_weight: float = Field(HealConfig.task_lm_weight, ge=0, le=100, description="Add this weight x the "
                                  "next-token loss on the task's train split (prompts with their answers) to the KL "
                                  "(0: the KL on the healing corpus alone)")

    def config(self, seed: int) -> HealConfig:
        return HealConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr, seed=seed,
                          every=self.every, lora_rank=self.lora_rank, task_lm_weight=self.task_lm_weight)


class ConvertParams(_Params):
    """Everything a conversion depends on (the flow `convert` takes these fields as its parameters)."""

    model: ModelSource = Field("smollm2-135m", description="Teacher: a built-in model (smollm2-135m: the "
                               "packaged SmolLM2-135M-Instruct; tiny-* and smollm2-135m-random: random weights for "
                               "tests and speed), a save_pretrained folder, or a Hugging Face hub id")
    task: TaskParams = Field(default_factory=TaskParams, description="The task the hybrid is built and scored for")
    mixer: MixerName = Field("gated_deltanet", description="Linear-attention student type: gated_deltanet "
                             "(gated delta rule), gla (gated linear attention) or jetblock (dynamic convolution)")
    distill: DistillBudget = Field(default_factory=DistillBudget, description="Phase 1: what each layer's "
                                   "student trains on, and for how long")
    tolerance: ToleranceParams = Field(default_factory=ToleranceParams, description="How far below the "
                                       "teacher's validation score the search may go")
    acceptance: AcceptanceParams = Field(default_factory=AcceptanceParams, description="When a greedy round's "
                                         "best candidate is committed")
    # up to 4 linear layers: the paper's best hybrids swap ~3.8
    max_layers: int | None = Field(4, ge=1, description="Stop the search after this many linear layers "
                                   "(None: until a round is rejected or every layer is linear)")
    seed: int = Field(0, ge=0, description="Seed of distillation and bootstrap")
    runner: RunnerParams = Field(default_factory=RunnerParams, description="Where the per-layer and "
                                 "per-candidate tasks run")
    speed: SpeedParams = Field(default_factory=SpeedParams, description="The speed benchmark of teacher, M_best "
                               "and M_opt")
    heal: HealParams = Field(default_factory=HealParams, description="Optional end-to-end healing of M_opt "
                             "after the search")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="MLflow tracking and the model "
                                     "registry")
    output_dir: str = Field("runs", description="Where run folders go: OUTPUT_DIR/RUN_ID/... A relative path is "
                            "taken from the working folder of the process that runs the flow (for `dtr ui up`: "
                            "the folder it was started in)")
    run_id: str | None = Field(None, description="Run folder name (letters, digits, '.', '_', '-'; at most 100); "
                               "None: derived from the parameters, so the same parameters resume the same run")

    @field_validator("run_id")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (not RUN_ID_PATTERN.fullmatch(value) or ".." in value):
            raise ValueError("must be 1-100 letters, digits, '.', '_' or '-', start with a letter or digit and "
                             "hold no '..' (it names one folder inside output_dir)")
        return value

    @model_validator(mode="after")
    def _run_folder_inside_output_dir(self) -> ConvertParams:
        if self.run_id is not None:
            run_folder(self.output_dir, self.run_id)
        return self

    def result_dict(self) -> dict[str, Any]:
        """The parameters that decide the result (what the run id hashes): not where or how it runs."""
        return self.model_dump(mode="json", exclude={"runner", "tracking", "output_dir", "run_id", "speed"})

    def resolved_run_id(self) -> str:
        from dtr_core.artifacts import hash_json
        from dtr_core.run_layout import slug

        if self.run_id:
            return self.run_id
        return f"{slug(self.model, 24)}-{slug(self.task.label, 24)}-{hash_json(self.result_dict())[:10]}"

    def registered_name(self) -> str:
        from dtr_core.run_layout import slug

        return self.tracking.model_name or f"dtr-{slug(self.model, 40)}-{slug(self.task.label, 40)}"


def describe_parameters(model: type[BaseModel]):
    """A decorator that appends an `Args:` section to a flow function's docstring: each parameter named like a
    field of `model` described by that field's description. Prefect shows these beside the fields of the flow's
    form; it reads them when the flow is created, so this goes below `@flow`."""

    def decorate(fn):
        import inspect

        lines = [f"    {name}: {' '.join(model.model_fields[name].description.split())}"
                 for name in inspect.signature(fn).parameters
                 if name in model.model_fields and model.model_fields[name].description]
        fn.__doc__ = (inspect.getdoc(fn) or "") + "\n\nArgs:\n" + "\n".join(lines) + "\n"
        return fn

    return decorate


PROFILES: dict[str, dict[str, Any]] = {
    "default": {},  # the parameter models' own defaults
    # The same path on a 4-layer random model: seconds per stage.
    "smoke": {
        "model": "tiny-llama",
        "task": {"validation_limit": 24, "test_limit": 24},
        "distill": {"tokens": 8 * 4 * 64, "seq_len": 64, "lr": 1e-3,
                    "max_normalized_loss": RANDOM_TEACHER_MAX_NORMALIZED_LOSS},  # a random model: see there
        "max_layers": None,
        "speed": {"context_len": 256, "decode_tokens": 8, "repeats": 1},
    },
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` onto `base`; nested dicts merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
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
    values = merge(PROFILES[profile], {k: v for k, v in overrides.items() if v is not None})
    try:
        return ConvertParams.model_validate(values)
    except ValidationError as error:
        raise ValueError(one_line(error)) from None


def check_params(params: ConvertParams) -> None:
    """Everything pydantic cannot check, before any work: one-line ValueError, nothing written, no MLflow run.

    Cheapest first: runner and output folder, tracking store and Dask scheduler (a 3 s timeout each), the
    model source (config, architecture, complete and finite weights, tokenizer: `dtr_core.preflight`), the
    task data and its splits, the corpus, tolerance and acceptance, then the free disk for the run's estimate.
    """
    from dtr_core import preflight
    from dtr_core.run_layout import RunLayout
    from dtr_core.run_lock import check_free
    from tasks.checks import check_dask_address, check_tracking_uri
    from tasks.tracking import resolve_tracking_uri

    # arguments alone first (no file, server or heavy import), then files and servers
    if params.runner.dask_address is not None and params.runner.kind != "dask":
        raise ValueError(f"runner.dask_address is set but runner.kind is '{params.runner.kind}'; use kind 'dask'")
    for name, option in (("every", "--heal-every"), ("lora_rank", "--heal-lora-rank"),
                         ("task_lm_weight", "--heal-task-lm-weight")):
        if getattr(params.heal, name) and not params.heal.enabled:
            raise ValueError(f"heal.{name} is {getattr(params.heal, name)} but healing is off; add --heal "
                             f"(heal.enabled) or drop {option}")
    if params.heal.every and params.heal.lora_rank:
        raise ValueError("--heal-every and --heal-lora-rank cannot be combined: the continued search scores its "
                         "candidates on the teacher's own frozen weights, which LoRA changes; drop one of them")
    _check_task_name(params.task)
    _check_task_metric(params)
    check_corpus_exists(params.distill.corpus)
    if params.heal.enabled:
        check_corpus_exists(params.heal.corpus)
    params.tolerance.build()
    params.acceptance.build(params.seed)
    if params.tracking.register_models:
        check_registered_model_name(params.registered_name())
    preflight.check_output_dir(params.output_dir)
    facts = preflight.check_model_source(params.model)
    run_dir = run_folder(params.output_dir, params.resolved_run_id())
    check_free(run_dir)  # another process converting the same run: refused before any work
    RunLayout(run_dir).check_owned()
    _check_task_data(params.task, params.acceptance.mode)
    _check_corpus_data(params.distill.corpus)
    if params.heal.enabled:
        _check_corpus_data(params.heal.corpus)
        check_seq_lens([params.heal.seq_len], facts.max_positions)
    check_tracking_uri(resolve_tracking_uri(params.tracking.tracking_uri))
    if params.runner.dask_address is not None:
        check_dask_address(params.runner.dask_address)
    check_seq_lens(params.distill.seq_lens, facts.max_positions)
    needed = preflight.estimate_disk_bytes(facts.num_layers, facts.hidden_size, facts.num_params)
    preflight.check_output_dir(params.output_dir, max(0, needed - preflight.folder_bytes(run_dir)))


_last_checked = {"hash": None}  # the JSON hash of the parameters `check_params_once` last passed
_check_lock = threading.Lock()


def check_params_once(params: ConvertParams) -> None:
    """`check_params`, unless the same parameters (by JSON hash) already passed it in this process."""
    from dtr_core.artifacts import hash_json

    digest = hash_json(params.model_dump(mode="json"))
    with _check_lock:
        if _last_checked["hash"] == digest:
            return
        check_params(params)
        _last_checked["hash"] = digest


def _check_task_name(task: TaskParams) -> None:
    if task.data_file is None and task.name not in _builtin_tasks() and not task.name.endswith(".json"):
        raise ValueError(f"unknown task '{task.name}'; choose one of: {', '.join(sorted(_builtin_tasks()))}, "
                         "a task spec .json file, or --data-file")
    if task.data_file is None and task.name.endswith(".json") and not Path(task.name).expanduser().is_file():
        raise ValueError(f"task spec {task.name} does not exist; pass an existing .json file or a built-in task")


def _check_task_metric(params: ConvertParams) -> None:
    """The metric and verbaliser scoring fit the task kind (a built-in task or a data file's, known without
    reading data), and bootstrap acceptance can use the metric. `recall:<class>` classes: `_check_task_data`."""
    from dtr_core.evaluation import TASKS, VERBALISER_SCORINGS, get_task
    from dtr_core.evaluation.metrics import DEFAULT_METRICS, check_bootstrap_metric, parse_metric
    from dtr_core.evaluation.text_metrics import GENERATIVE_METRICS

    task = params.task
    if task.verbaliser_scoring is not None and task.verbaliser_scoring not in VERBALISER_SCORINGS:
        raise ValueError(f"unknown verbaliser scoring '{task.verbaliser_scoring}'; choose one of: "
                         f"{', '.join(VERBALISER_SCORINGS)}")
    if task.data_file is not None:
        if task.reference_columns is not None:
            kind = "generative"
        else:
            kind = "classification" if task.label_column else "language_modeling"
            if task.metric is not None and task.metric in GENERATIVE_METRICS:
                raise ValueError(f"metric '{task.metric}' scores generated answers, but the task has no reference "
                                 "column; pass --reference-column COLUMN (the column holding the answers)")
        labels = list(task.verbalisers) or None
    elif task.name in TASKS:
        built = get_task(task.name)  # a built-in task reads no data until it is split
        kind, labels = built.kind, getattr(built, "labels", None)
    else:
        return  # a task spec file: checked when it is built (`_check_task_data`)
    metric = task.metric or DEFAULT_METRICS[kind]
    parse_metric(metric, kind, labels)
    if kind != "classification" and task.verbaliser_scoring is not None:
        raise ValueError("verbaliser scoring applies to classification tasks; this task is a "
                         f"{'perplexity' if kind == 'language_modeling' else 'generative'} task")
    if params.acceptance.mode == "bootstrap":
        check_bootstrap_metric(metric, f"task '{task.label}'")


def _check_task_data(task: TaskParams, acceptance_mode: str = "point") -> None:
    built = task.build()  # a user task reads its data here: types, encoding, columns, labels, metric
    validation = built.split("validation")  # the splits: enough rows for validation + test + 1 train
    test = built.split("test")
    if acceptance_mode == "bootstrap":
        from dtr_core.evaluation.metrics import check_bootstrap_metric

        check_bootstrap_metric(built.metric, f"task '{task.label}'")
    if built.kind == "classification":
        searched, reported = validation[: task.validation_limit], test[: task.test_limit]
        built.check_metric_defined(searched, f"the {len(searched)} validation examples the search uses")
        built.check_metric_defined(reported, f"the {len(reported)} test examples the report uses")


def check_corpus_exists(corpus: str) -> None:
    """A corpus source names the built-in text, a hub dataset or an existing file or folder (one-line ValueError)."""
    if corpus != "bbc" and not corpus.startswith("hf:") and not Path(corpus).expanduser().exists():
        raise ValueError(f"corpus {corpus!r} does not exist; use 'bbc', a file or folder, "
                         "or hf:<dataset>[:<config>]:<split>")


def _check_corpus_data(corpus: str) -> None:
    """A corpus file or folder must give its first document (a hub corpus is read when the run starts)."""
    if corpus != "bbc":
        from dtr_core.distill.corpus import load_corpus

        if corpus.startswith("hf:"):
            load_corpus(corpus)
            return
        try:
            next(iter(load_corpus(corpus)))
        except StopIteration:
            raise ValueError(f"distillation corpus {corpus!r} holds no text; use a corpus with documents") from None
        except OSError as error:
            raise ValueError(f"distillation corpus {corpus!r} cannot be read ({error.strerror or error})") from None


def _builtin_tasks() -> set[str]:
    from dtr_core.evaluation import TASKS

    return set(TASKS)
