"""Greedy generation for generative tasks: batched, left-padded, with the hybrid cache.

    batches = encode_prompts(task, examples, tokenizer)      # once per split
    result = generative_result(model, task, split, batches)  # EvalResult, scores in [0, 1]

Prompts are LEFT padded, so every row's next token sits in the last column. Full-attention layers read the
padding from the attention mask; linear-attention students make pads contribute nothing to their state
(`dtr_core.mixers.base.real_tokens`), so a row's generation does not depend on the rows it is batched with
(tested against one row at a time). Each row's positions start at 0 at its first real token, as when it
runs alone. The cache is a `HybridCache` with the model's own layer map (a KV cache for softmax layers, a
fixed-size state for linear ones), whether the model is a saved hybrid or a teacher with students swapped in.

Generation stops for a row at the tokenizer's EOS, at the first of the task's `stop` strings (cut from the
answer with everything after it), or after `max_new_tokens` tokens; the batch stops when every row has.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dtr_core.evaluation.tasks import Example, GenerativeTask


@dataclass
class GenerationBatch:
    """One batch of left-padded prompts and what scoring their answers needs."""

    kind: str                      # "generative"
    input_ids: torch.Tensor        # (R, T) int64, left padded
    attention_mask: torch.Tensor   # (R, T) int64, 1 on real tokens
    example_index: torch.Tensor    # (R,) index of each row's example in the list given to `encode_prompts`
    examples: tuple[Example, ...]  # the rows' examples (their references)
    tokenizer: object              # decodes the answers

    @property
    def num_examples(self) -> int:
        return int(self.example_index.numel())


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def encode_prompts(task: GenerativeTask, examples: Sequence[Example], tokenizer,
                   batch_size: int = 16, max_batch_tokens: int = 4096) -> list[GenerationBatch]:
    """The prompts of `examples` tokenised (BOS first when `task.add_bos`), sorted by length and cut into
    left-padded batches of at most `batch_size` rows and about `max_batch_tokens` tokens."""
    bos = [tokenizer.bos_token_id] if task.add_bos and tokenizer.bos_token_id is not None else []
    prompts = [task.prompt(example) for example in examples]
    ids = [bos + list(row) for row in tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    pad = _pad_id(tokenizer)
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and \
                (len(groups[-1]) + 1) * (len(ids[groups[-1][0]]) + task.max_new_tokens) <= max_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    batches = []
    for group in groups:
        width = max(len(ids[i]) for i in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, width - len(ids[i]):] = 1
        batches.append(GenerationBatch("generative", input_ids, mask, torch.tensor(group, dtype=torch.long),
                                       tuple(examples[i] for i in group), tokenizer))
    return batches


def layer_map_of(model) -> list[str]:
    """Per decoder layer: "full" for softmax attention, else the student's mixer name."""
    from dtr_core.hybrid.surgery import attention_module, num_layers
    from dtr_core.mixers import LinearMixer
    from dtr_core.mixers.state_cache import FULL

    modules = [attention_module(model, index) for index in range(num_layers(model))]
    return [module.name if isinstance(module, LinearMixer) else FULL for module in modules]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


@torch.inference_mode()
def generate_greedy(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
    """The greedy answers of left-padded prompts (R, T): one decoded string per row, cut at the first stop
    string; a row ends at EOS, at a stop string or after `max_new_tokens` tokens."""
    from dtr_core.mixers.state_cache import HybridCache

    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    rows = ids.shape[0]
    cache = HybridCache(model.config, layer_map_of(model))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True).logits[:, -1]
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    eos = tokenizer.eos_token_id
    for step in range(max_new_tokens):
        next_tokens = logits.argmax(dim=-1)
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if token == eos:
                done[row] = True
                continue
            generated[row].append(token)
            if stop and _cut_at_stop(tokenizer.decode(generated[row]), stop)[1]:
                done[row] = True
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=next_tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                       cache=cache, use_cache=True).logits[:, -1]
    return [_cut_at_stop(tokenizer.decode(tokens), stop)[0] for tokens in generated]


def generate_answers(model, task: GenerativeTask, batches: Sequence[GenerationBatch]) -> list[str]:
    """The model's answer to every example of one `encode_prompts` call, in the original order."""
    answers: dict[int, str] = {}
    for batch in batches:
        texts = generate_greedy(model, batch.tokenizer, batch.input_ids, batch.attention_mask,
                                task.max_new_tokens, task.stop)
        answers.update(zip(batch.example_index.tolist(), texts))
    if sorted(answers) != list(range(len(answers))):
        raise ValueError("generation batches do not cover examples 0..n-1 exactly once; pass every batch of one "
                         "encode_prompts call")
    return [answers[i] for i in range(len(answers))]


def generative_result(model, task: GenerativeTask, split: str, batches: Sequence[GenerationBatch]):
    """`EvalResult` of `model` on the examples of `batches`: the answers (`predictions`), their per-example
    scores (`per_example`, weight 1) and, in `metrics`, every metric that applies (exact_match, f1,
    rouge_l, and regex_match when the task has an `answer_regex`). Runs in inference mode, eval mode (the
    training flag is restored)."""
    from dtr_core.evaluation import text_metrics
    from dtr_core.evaluation.results import EvalResult

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, task, batches)
    finally:
        model.train(was_training)
    examples: list[Example] = [None] * len(answers)  # type: ignore[list-item]
    for batch in batches:
        for index, example in zip(batch.example_index.tolist(), batch.examples):
            examples[index] = example
    names = [m for m in text_metrics.GENERATIVE_METRICS if m != "regex_match" or task.answer_regex]
    summary = {}
    for name in names:
        score = text_metrics.scorer(name, task.answer_regex)
        values = [text_metrics.best_over_references(score, a, e.references) for a, e in zip(answers, examples)]
        summary[name] = sum(values) / len(values)
        if name == task.metric:
            per_example = values
    score = sum(per_example) / len(per_example)
    summary[task.metric] = score
    return EvalResult(task=task.name, split=split, metric=task.metric, score=score, metrics=summary,
                      n=len(answers), per_example=tuple(per_example), weights=(1.0,) * len(answers),
                      predictions=tuple(answers), label_logprobs=((),) * len(answers),
                      higher_is_better=True, seconds=time.perf_counter() - start)


def regex_warning(task, answers: Sequence[str], shown: int = 3) -> str | None:
    """A warning when `task` (generative, with an `answer_regex`) extracts nothing from any of `answers` (the
    teacher's): regex_match would score every hybrid 0, so the search could not tell them apart. It quotes the
    first `shown` answers. None when the regex matches one of them, or the task has no regex."""
    import re

    if getattr(task, "answer_regex", None) is None or not answers:
        return None
    pattern = re.compile(task.answer_regex)
    if any(pattern.search(answer) for answer in answers):
        return None
    examples = "; ".join(repr(answer[:80]) for answer in answers[:shown])
    return (f"answer_regex {task.answer_regex!r} matches none of the teacher's {len(answers)} answers on task "
            f"'{task.name}' (e.g. {examples}); regex_match will score 0 for every hybrid. Check the regex, the "
            f"stop strings and max_new_tokens ({task.max_new_tokens})")
