"""Label-likelihood and perplexity scoring for decoder LMs, split into encode / logits / score.

The split lets the search produce logits any way it likes (e.g. running only the layers above a swapped
layer from cached hidden states) and still score exactly as `evaluate` does:

    batches = encode(task, examples, tokenizer)            # once per split
    for batch in batches:
        logits = model_logits(model, batch)                 # or your own (R, P, V) / (R, T, V) logits
        scores = score_logits(batch, logits)                # BatchScores: per-example results

Classification (as lm-evaluation-harness' loglikelihood requests): the prediction is the label whose
verbaliser continuation has the highest log-likelihood after the prompt, compared as the task's
`verbaliser_scoring` says: `sum` (summed), `per_token` (divided by the continuation's token count,
lm-eval's acc_norm) or `per_byte` (by its UTF-8 byte count). Unset, it is `sum` when every verbaliser has
the same number of tokens (dividing by one shared count changes no argmax) and `per_token` otherwise, so
longer labels are not penalised; that choice is logged once per task and tokenizer. When every verbaliser
is one distinct token, one row per example is enough (the next-token distribution at the prompt's last
position scores all labels); otherwise there is one row `prompt + continuation` per (example, label).
Prompt and continuation are tokenised separately and concatenated (the continuation as it tokenises
after a prompt, `_continuation_ids`), so both paths see the same tokens.
Language modelling: one row per document, `[BOS] + tokens[: max_tokens - 1]`, every token after the BOS
scored.

Rows are RIGHT padded. Everything is causal, so padding after a row's last real token cannot change
its logits; that keeps linear-attention students (which ignore padding masks) exact. Examples are sorted
by length inside `encode` to waste little padding; `example_index` maps results back.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dtr_core.evaluation.tasks import (
    VERBALISER_SCORINGS, ClassificationTask, Example, GenerativeTask, LanguageModelingTask, Task,
)

logger = logging.getLogger(__name__)
_announced: set[tuple[str, tuple[int, ...]]] = set()  # (task, verbaliser token counts) whose default was logged


@dataclass
class EncodedBatch:
    """One forward pass: R right-padded rows holding E examples, M scored tokens.

    `cells` index the flat (example, label) grid `local_example * num_labels + label`; a cell's score is
    the sum of its tokens' log-probabilities. Language modelling has one label (the document).
    """

    kind: str                      # "classification" | "language_modeling"
    input_ids: torch.Tensor        # (R, T) int64, right padded
    attention_mask: torch.Tensor   # (R, T) int64, 1 on real tokens
    logit_positions: torch.Tensor  # (P,) int64, sorted distinct sequence positions whose logits are used
    rows: torch.Tensor             # (M,) row of each scored token
    positions: torch.Tensor        # (M,) sequence position whose logits predict it
    columns: torch.Tensor          # (M,) index of that position in `logit_positions`
    targets: torch.Tensor          # (M,) the token id to predict
    cells: torch.Tensor            # (M,) flat (example, label) cell
    example_index: torch.Tensor    # (E,) index of each example in the list given to `encode`
    labels: torch.Tensor           # (E,) gold label index; -1 for language modelling
    num_labels: int                # C (1 for language modelling)
    label_divisors: torch.Tensor   # (C,) float64: a label's summed log-likelihood is divided by it to compare
    verbaliser_scoring: str = "sum"  # what `label_divisors` are: sum (ones), per_token, per_byte

    @property
    def num_examples(self) -> int:
        return int(self.example_index.numel())


@dataclass
class BatchScores:
    """Per-example results of one batch (CPU tensors)."""

    kind: str
    example_index: torch.Tensor    # (E,)
    label_logprobs: torch.Tensor   # (E, C) float64 summed log-likelihood per label (LM: of the document)
    token_counts: torch.Tensor     # (E, C) int64 tokens scored per cell
    predictions: torch.Tensor      # (E,) predicted label index (argmax of label_logprobs / label_divisors); -1 for LM
    labels: torch.Tensor           # (E,) gold label index; -1 for language modelling
    verbaliser_scoring: str = "sum"  # the batch's (`EncodedBatch.verbaliser_scoring`)

    @property
    def values(self) -> torch.Tensor:
        """(E,) float64 per-example values: correctness 0/1, or the document's summed NLL (nats)."""
        if self.kind == "language_modeling":
            return -self.label_logprobs[:, 0]
        return (self.predictions == self.labels).double()

    @property
    def weights(self) -> torch.Tensor:
        """(E,) float64 weights of `values`: 1, or the number of scored tokens."""
        if self.kind == "language_modeling":
            return self.token_counts[:, 0].double()
        return torch.ones(self.example_index.numel(), dtype=torch.float64)


def _encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def _continuation_ids(tokenizer, continuation: str) -> list[int]:
    """Tokens of a continuation as they appear after a prompt.

    Tokenised after a probe (":") and cut off it, which removes SentencePiece's start-of-text "▁" prefix
    (Llama-2 / Mistral tokenizers); byte-level BPE gives the same ids as encoding it alone.
    """
    probe = _encode_texts(tokenizer, [":"])[0]
    full = _encode_texts(tokenizer, [":" + continuation])[0]
    if len(full) > len(probe) and full[: len(probe)] == probe:
        return full[len(probe):]
    return _encode_texts(tokenizer, [continuation])[0]


def _bos(tokenizer, add_bos: bool) -> list[int]:
    return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# One unit per example: its rows and its scored tokens (local row, position, target, label).
_Unit = tuple[list[list[int]], list[tuple[int, int, int, int]], int]


def verbaliser_divisors(task: ClassificationTask, continuations: Sequence[Sequence[int]]) -> tuple[str, list[float]]:
    """(scoring, divisor per label): the task's `verbaliser_scoring`, or the default for these token ids
    (module docstring), and what each label's summed log-likelihood is divided by."""
    scoring = task.verbaliser_scoring
    lengths = tuple(len(ids) for ids in continuations)
    if scoring is None:
        scoring = "sum" if len(set(lengths)) == 1 else "per_token"
        if scoring == "per_token" and (task.name, lengths) not in _announced:
            _announced.add((task.name, lengths))
            logger.info("task '%s': verbalisers tokenise to different lengths %s, so labels are compared by "
                        "per-token log-likelihood (acc_norm); set verbaliser_scoring to choose", task.name,
                        dict(zip(task.labels, lengths)))
    if scoring == "sum":
        return scoring, [1.0] * len(lengths)
    if scoring == "per_token":
        return scoring, [float(n) for n in lengths]
    if scoring == "per_byte":
        return scoring, [float(len(c.encode("utf-8"))) for _, c in task.verbalisers]
    raise ValueError(f"unknown verbaliser scoring '{scoring}'; choose one of: {', '.join(VERBALISER_SCORINGS)}")


def _classification_units(task: ClassificationTask, examples: Sequence[Example], tokenizer,
                          mode: str) -> tuple[list[_Unit], str, list[float]]:
    bos = _bos(tokenizer, task.add_bos)
    prompts = [bos + ids for ids in _encode_texts(tokenizer, [task.prompt(e) for e in examples])]
    continuations = [_continuation_ids(tokenizer, c) for _, c in task.verbalisers]
    for label, ids in zip(task.labels, continuations):
        if not ids:
            raise ValueError(f"task '{task.name}': verbaliser of label '{label}' tokenises to nothing; use a non-empty continuation")
    scoring, divisors = verbaliser_divisors(task, continuations)
    single_ok = all(len(ids) == 1 for ids in continuations) and len({ids[0] for ids in continuations}) == len(continuations)
    if mode not in ("auto", "single", "multi"):
        raise ValueError(f"unknown scoring mode '{mode}'; choose one of: auto, multi, single")
    if mode == "single" and not single_ok:
        raise ValueError(f"task '{task.name}': mode 'single' needs one distinct token per verbaliser; use mode 'auto'")
    single = single_ok and mode != "multi"
    label_index = {label: i for i, label in enumerate(task.labels)}
    units = []
    for example, prompt in zip(examples, prompts):
        if not prompt:
            raise ValueError(f"task '{task.name}': example {example.uid} has an empty prompt and no BOS token to condition on")
        last = len(prompt) - 1
        if single:
            pairs = [(0, last, ids[0], c) for c, ids in enumerate(continuations)]
            units.append(([prompt], pairs, label_index[example.label]))
        else:
            rows = [prompt + ids for ids in continuations]
            pairs = [(c, last + j, token, c) for c, ids in enumerate(continuations) for j, token in enumerate(ids)]
            units.append((rows, pairs, label_index[example.label]))
    return units, scoring, divisors


def _language_modeling_units(task: LanguageModelingTask, examples: Sequence[Example], tokenizer) -> list[_Unit]:
    bos = _bos(tokenizer, task.add_bos)
    units = []
    for example, ids in zip(examples, _encode_texts(tokenizer, [e.text for e in examples])):
        row = (bos + ids)[: task.max_tokens]
        if len(row) < 2:
            raise ValueError(f"task '{task.name}': example {example.uid} has no token to score; drop empty documents")
        units.append(([row], [(0, t, row[t + 1], 0) for t in range(len(row) - 1)], -1))
    return units


def _make_batch(kind: str, units: list[_Unit], indices: list[int], num_labels: int, pad_id: int,
                scoring: str, divisors: list[float]) -> EncodedBatch:
    rows: list[list[int]] = []
    scored: list[tuple[int, int, int, int]] = []
    labels = []
    for local, i in enumerate(indices):
        unit_rows, pairs, label = units[i]
        scored += [(len(rows) + r, pos, target, local * num_labels + c) for r, pos, target, c in pairs]
        rows += unit_rows
        labels.append(label)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
    row_ids, positions, targets, cells = (torch.tensor(column, dtype=torch.long) for column in zip(*scored))
    logit_positions = torch.unique(positions)  # sorted
    return EncodedBatch(
        kind=kind, input_ids=input_ids, attention_mask=attention_mask, logit_positions=logit_positions,
        rows=row_ids, positions=positions, columns=torch.searchsorted(logit_positions, positions),
        targets=targets, cells=cells, example_index=torch.tensor(indices, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long), num_labels=num_labels,
        label_divisors=torch.tensor(divisors, dtype=torch.float64), verbaliser_scoring=scoring,
    )


def encode(task: Task, examples: Sequence[Example], tokenizer, batch_size: int = 16,
           max_batch_tokens: int = 4096, mode: str = "auto") -> list[EncodedBatch]:
    """Tokenise `examples` of `task` into right-padded batches, longest first.

    `batch_size`: most rows (sequences) per batch; `max_batch_tokens`: most rows x padded length
    (bounds the logits of long documents); an example's rows always share a batch, so one example may
    exceed both. `mode` (classification): `auto` uses the one-row-per-example path when every verbaliser
    is a single distinct token, `multi` forces one row per (example, label), `single` requires the former.
    A generative task gives left-padded prompt batches instead (`generation.encode_prompts`).
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size} and {max_batch_tokens}")
    if not examples:
        raise ValueError(f"no examples to encode for task '{task.name}'")
    if isinstance(task, GenerativeTask):
        from dtr_core.evaluation.generation import encode_prompts

        return encode_prompts(task, examples, tokenizer, batch_size, max_batch_tokens)  # type: ignore[return-value]
    if isinstance(task, ClassificationTask):
        units, scoring, divisors = _classification_units(task, examples, tokenizer, mode)
        num_labels = len(task.labels)
    elif isinstance(task, LanguageModelingTask):
        units, num_labels, scoring, divisors = _language_modeling_units(task, examples, tokenizer), 1, "sum", [1.0]
    else:
        raise ValueError(f"cannot score task '{task.name}' of kind '{task.kind}'")
    lengths = [max(len(row) for row in unit[0]) for unit in units]
    order = sorted(range(len(units)), key=lambda i: (-lengths[i], i))
    pad_id = _pad_id(tokenizer)
    batches, current, current_rows = [], [], 0
    for i in order:
        unit_rows = len(units[i][0])
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and (current_rows + unit_rows > batch_size or (current_rows + unit_rows) * width > max_batch_tokens):
            batches.append(_make_batch(task.kind, units, current, num_labels, pad_id, scoring, divisors))
            current, current_rows = [], 0
        current.append(i)
        current_rows += unit_rows
    batches.append(_make_batch(task.kind, units, current, num_labels, pad_id, scoring, divisors))
    return batches


def model_inputs(model, batch: EncodedBatch) -> dict:
    """The forward arguments `model_logits` calls `model` with (the fast scorer traces this very forward):
    `logits_to_keep` only when fewer positions are used and the model's forward takes it."""
    device = next(model.parameters()).device
    inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
              "use_cache": False}
    if batch.logit_positions.numel() < batch.input_ids.shape[1] \
            and "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = batch.logit_positions.to(device)
    return inputs


def model_logits(model, batch: EncodedBatch) -> torch.Tensor:
    """Logits of a Hugging Face causal LM at `batch.logit_positions`: (R, P, V), or (R, T, V) when the
    model's forward has no `logits_to_keep`. Call under `torch.inference_mode()`."""
    return model(**model_inputs(model, batch)).logits


def score_logits(batch: EncodedBatch, logits: torch.Tensor) -> BatchScores:
    """Per-example label log-likelihoods and predictions from logits of `batch`.

    `logits`: (R, P, V) at `batch.logit_positions` or (R, T, V) at every position (any device/dtype;
    log-softmax runs in float32, sums in float64).
    """
    num_rows, width = batch.input_ids.shape
    if logits.dim() != 3 or logits.shape[0] != num_rows:
        raise ValueError(f"logits must be (R={num_rows}, P or T, V), got {tuple(logits.shape)}")
    if logits.shape[1] == batch.logit_positions.numel():
        columns = batch.columns
    elif logits.shape[1] == width:
        columns = batch.positions
    else:
        raise ValueError(f"logits have {logits.shape[1]} positions; expected P={batch.logit_positions.numel()} "
                         f"(logit_positions) or T={width}")
    device = logits.device
    vocab = logits.shape[-1]
    keys = batch.rows.to(device) * logits.shape[1] + columns.to(device)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    selected = logits.reshape(-1, vocab)[unique_keys].float()  # (Q, V) rows of needed positions
    log_norm = torch.logsumexp(selected, dim=-1)  # (Q,)
    token_logprobs = (selected[inverse, batch.targets.to(device)] - log_norm[inverse]).double().cpu()  # (M,)
    num_examples, num_labels = batch.num_examples, batch.num_labels
    sums = torch.zeros(num_examples * num_labels, dtype=torch.float64).index_add_(0, batch.cells, token_logprobs)
    counts = torch.zeros(num_examples * num_labels, dtype=torch.long).index_add_(
        0, batch.cells, torch.ones_like(batch.cells))
    label_logprobs = sums.view(num_examples, num_labels)
    if batch.kind == "classification":
        predictions = (label_logprobs / batch.label_divisors).argmax(dim=1)  # ties: the first label
    else:
        predictions = torch.full((num_examples,), -1, dtype=torch.long)
    return BatchScores(kind=batch.kind, example_index=batch.example_index, label_logprobs=label_logprobs,
                       token_counts=counts.view(num_examples, num_labels), predictions=predictions,
                       labels=batch.labels, verbaliser_scoring=batch.verbaliser_scoring)
