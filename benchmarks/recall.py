"""Long-context recall probe: teacher vs a DtR hybrid on synthetic retrieval at growing context.

`passkey` (a key hidden in filler at a depth of 5%-95%) and `kv` (one code asked among lines "The code for <name>
is <5 digits>."), each prompt exactly T tokens, seeded, the same for both models: exact match of the greedy
answer under teacher forcing, and the answer's NLL per token. The hybrid: `--hybrid DIR`, else `--layers` (or
`--k` evenly spread) of the teacher made linear with `--students DIR` or students distilled here.
Reading the numbers: docs/BENCHMARKS_RECALL.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import int_list, name_list, option
from benchmarks.students import DISTILL, QUICK_DISTILL, WORK_DIR, ensure_students

logger = logging.getLogger("benchmarks.recall")

PROBES = ("passkey", "kv")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Louis",
         "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rachel", "Simon", "Tina", "Victor", "Wendy", "Xavier",
         "Yvonne", "Zoe")


@dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    contexts: tuple[int, ...] = option((256, 512, 1024, 2048, 4096), "prompt lengths, K = 1024", int_list, minimum=1)
    samples: int = option(16, "prompts per probe and context", minimum=1)
    probes: tuple[str, ...] = option(PROBES, "comma-separated: passkey, kv", name_list)
    hybrid: str | None = option(None, "a saved hybrid folder (e.g. runs/<id>/hybrids/opt)")
    students: str | None = option(None, "students folder (runs/<id>/students); default: distil the needed layers "
                                  "here with a small budget")
    layers: tuple[int, ...] | None = option(None, "linear layers, e.g. M_opt's: 3,7,12", int_list)
    k: int | None = option(None, "else: k evenly interleaved linear layers (None: L/4)", int, minimum=1)
    work_dir: str = option(WORK_DIR, "where students distilled here live (shared with dtr bench placements)")
    seed: int = option(0, "prompt seed")
    distill_tokens: int | None = option(None, "students distilled here: teacher tokens (None: placements' budget)",
                                        int, minimum=1)
    distill_seq_len: int | None = option(None, "students distilled here: tokens per training sequence", int,
                                         minimum=1)
    distill_steps: int | None = option(None, "students distilled here: steps per layer", int, minimum=1)


def check(s: Settings, preset: str | None) -> Settings:
    unknown = sorted(set(s.probes) - set(PROBES))
    if unknown or not s.probes:
        raise ValueError(f"unknown probes {unknown or list(s.probes)}; choose from: {', '.join(PROBES)}")
    if s.hybrid is not None and (s.students or s.layers or s.k):
        raise ValueError("--hybrid is a complete model: do not combine it with --students, --layers or --k")
    if s.layers is not None and s.k is not None:
        raise ValueError("give --layers or --k, not both")
    budget = {"--distill-tokens": s.distill_tokens, "--distill-seq-len": s.distill_seq_len,
              "--distill-steps": s.distill_steps}
    given = [name for name, value in budget.items() if value is not None]
    if given and (s.hybrid or s.students):
        raise ValueError(f"{', '.join(given)} set(s) the budget of students distilled here; "
                         "drop it, or drop --hybrid/--students")
    harness.check_students(s.students)
    default = QUICK_DISTILL if preset == "quick" else DISTILL  # the budget of `dtr bench placements`
    return dataclasses.replace(s, contexts=tuple(sorted(set(s.contexts))), **{
        name: getattr(s, name) or default[name] for name in ("distill_tokens", "distill_seq_len", "distill_steps")})


# --- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    probe: str
    context: int
    depth: float
    ids: tuple[int, ...]  # the whole prompt, exactly `context` tokens (BOS included when the tokenizer has one)
    answer: tuple[int, ...]  # answer tokens, scored by teacher forcing
    answer_text: str


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _filler(tokenizer, n: int) -> tuple[list[int], list[int]]:
    """n filler tokens (whole sentences repeated, the last one cut) and the sentence starts among them."""
    sentences = [_ids(tokenizer, sentence + ". ") for sentence in FILLER.split(". ") if sentence.strip(". ")]
    ids, starts = [], []
    while len(ids) < n:
        for sentence in sentences:
            starts.append(len(ids))
            ids.extend(sentence)
    return ids[:n], [start for start in starts if start <= n]


def passkey_prompt(tokenizer, context: int, depth: float, rng: random.Random) -> Prompt:
    key = str(rng.randint(10000, 99999))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    needle = _ids(tokenizer, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = _ids(tokenizer, "\nWhat is the pass key? The pass key is")
    answer = _ids(tokenizer, f" {key}")
    space = context - len(bos) - len(needle) - len(question)
    if space < 1:
        raise ValueError(f"context {context} is too short for the passkey prompt (needs > {context - space})")
    filler, starts = _filler(tokenizer, space)
    before = min(starts, key=lambda start: abs(start - depth * space))  # the sentence start nearest the depth
    ids = bos + filler[:before] + needle + filler[before:] + question
    return Prompt("passkey", context, depth, tuple(ids), tuple(answer), key)


def kv_prompt(tokenizer, context: int, depth: float, rng: random.Random) -> Prompt:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    lines, used = [], len(bos)
    index = 0
    longest = "Yvonne 999"
    reserve = len(_ids(tokenizer, f"\nWhat is the code for {longest}? The code for {longest} is"))  # the question
    while True:
        name = f"{NAMES[index % len(NAMES)]} {index // len(NAMES) + 1}"
        code = str(rng.randint(10000, 99999))
        line = _ids(tokenizer, f"The code for {name} is {code}.\n")
        if used + len(line) > context - reserve:
            break
        lines.append((name, code, line))
        used += len(line)
        index += 1
    if not lines:
        raise ValueError(f"context {context} is too short for the key-value prompt")
    target = min(len(lines) - 1, int(depth * len(lines)))
    name, code, _ = lines[target]
    question = _ids(tokenizer, f"\nWhat is the code for {name}? The code for {name} is")
    answer = _ids(tokenizer, f" {code}")
    body = bos + [token for _, _, line in lines for token in line]
    pad = context - len(body) - len(question)
    if pad < 0:
        raise ValueError(f"context {context} is too short for the key-value question")
    ids = body[: len(bos)] + _filler(tokenizer, pad)[0] + body[len(bos):] + question  # filler first: keeps depths
    return Prompt("kv", context, depth, tuple(ids), tuple(answer), code)


BUILDERS = {"passkey": passkey_prompt, "kv": kv_prompt}


def make_prompts(tokenizer, probes: Sequence[str], contexts: Sequence[int], samples: int, seed: int) -> list[Prompt]:
    """`samples` prompts per probe and context, depths evenly spread over 5%..95%; seeded."""
    prompts = []
    for probe in probes:
        for context in contexts:
            rng = random.Random(f"{seed}-{probe}-{context}")
            for i in range(samples):
                depth = 0.05 + 0.9 * (i + 0.5) / samples
                prompt = BUILDERS[probe](tokenizer, context, depth, rng)
                if len(prompt.ids) != context:
                    raise RuntimeError(f"{probe} prompt has {len(prompt.ids)} tokens, expected {context}")
                prompts.append(prompt)
    return prompts


# --- scoring -------------------------------------------------------------------------------------


@torch.inference_mode()
def score_prompt(model, prompt: Prompt) -> dict:
    """Teacher-forced greedy check of the answer: (correct, mean answer NLL per token)."""
    ids = torch.tensor([list(prompt.ids) + list(prompt.answer)], dtype=torch.long)
    n = len(prompt.answer)
    logits = model(ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n].float()  # predicts answer tokens
    target = torch.tensor(prompt.answer, dtype=torch.long)
    correct = bool((logits.argmax(-1) == target).all())
    nll = float(torch.nn.functional.cross_entropy(logits, target))
    return {"correct": correct, "nll": nll}


def evaluate_model(model, prompts: Sequence[Prompt], label: str) -> list[dict]:
    started, model = time.perf_counter(), model.eval()
    rows = [{"probe": p.probe, "context": p.context, "depth": p.depth, **score_prompt(model, p)}
            for p in prompts]
    logger.info("%s: %d prompts in %.1f s", label, len(prompts), time.perf_counter() - started)
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["probe"], r["context"]), []).append(r)
    out = []
    for (probe, context), items in sorted(cells.items()):
        n = len(items)
        accuracy = sum(r["correct"] for r in items) / n
        out.append({"probe": probe, "context": context, "n": n, "accuracy": accuracy,
                    "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
                    "nll": sum(r["nll"] for r in items) / n})
    return out


# --- the hybrid ----------------------------------------------------------------------------------


def build_contender(teacher, tokenizer, s: Settings) -> tuple[object, dict]:
    """The hybrid to compare and a description of it."""
    from dtr_core.search.baselines import uniform_layers
    from dtr_core.distill.training import load_students
    from dtr_core.hybrid.model import layer_map, make_hybrid
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import num_layers

    if s.hybrid is not None:
        hybrid, _ = load_model(s.hybrid)
        kinds = layer_map(hybrid)
        return hybrid.eval(), {"source": f"saved hybrid {harness.shown(s.hybrid)}",
                               "linear_layers": [i for i, kind in enumerate(kinds) if kind != "full"],
                               "mixers": sorted(set(kinds) - {"full"})}
    L = num_layers(teacher)
    if s.layers is not None:
        layers, placement = sorted(s.layers), "given layers"
    else:
        k = s.k if s.k is not None else L // 4
        layers, placement = list(uniform_layers(L, k)), f"uniform k={k}"
    if any(not 0 <= layer < L for layer in layers):
        raise ValueError(f"--layers {layers} out of range for a {L}-layer model")
    students_dir, source = s.students, "given students"
    if students_dir is None:
        students_dir = ensure_students(teacher, tokenizer, s.model, "gated_deltanet", s.work_dir, layers,
                                       s.distill_tokens, s.distill_seq_len, s.distill_steps)["dir"]
        source = (f"students distilled here ({s.distill_tokens} tokens in sequences of {s.distill_seq_len}, "
                  f"{s.distill_steps} steps)")
    students = load_students(students_dir, teacher, layers=layers)
    missing = sorted(set(layers) - set(students))
    if missing:
        raise ValueError(f"no usable student for layers {missing} in {students_dir}")
    return make_hybrid(teacher, students), {"source": f"{source}: {harness.shown(students_dir)}",
                                            "placement": placement, "linear_layers": layers,
                                            "mixers": sorted({st.name for st in students.values()})}


def measure(s: Settings) -> dict:
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import num_layers

    teacher, tokenizer = load_model(s.model)
    teacher.eval()
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and max(s.contexts) + 8 > limit:
        raise ValueError(f"context {max(s.contexts)} exceeds the model's {limit} positions")
    prompts = make_prompts(tokenizer, s.probes, s.contexts, s.samples, s.seed)
    hybrid, description = build_contender(teacher, tokenizer, s)
    for model in (teacher, hybrid):  # warm-up: first-call allocations, not scored
        score_prompt(model, prompts[0])
    results = {name: evaluate_model(model, prompts, name) for name, model in (("teacher", teacher),
                                                                              ("hybrid", hybrid))}
    return {
        "num_layers": num_layers(teacher),
        "hybrid": description,
        "answers": [{"probe": p.probe, "context": p.context, "depth": p.depth, "answer": p.answer_text,
                     "answer_tokens": len(p.answer)} for p in prompts],
        "per_prompt": results,
        "summary": {name: summarise(rows) for name, rows in results.items()},
    }


# --- report --------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s, h = result["settings"], result["hybrid"]
    teacher = {(r["probe"], r["context"]): r for r in result["summary"]["teacher"]}
    rows = [[r["probe"], str(r["context"]), str(r["n"]), f"{t['accuracy']:.2f} ± {t['stderr']:.2f}",
             f"{r['accuracy']:.2f} ± {r['stderr']:.2f}", f"{r['accuracy'] - t['accuracy']:+.2f}",
             f"{t['nll']:.2f}", f"{r['nll']:.2f}", f"{r['nll'] - t['nll']:+.2f}"]
            for r in result["summary"]["hybrid"] for t in [teacher[(r["probe"], r["context"])]]]
    return harness.report(f"Long-context recall: {s['model']} teacher vs hybrid", result, "\n".join([
        f"Hybrid: {len(h['linear_layers'])} of {result['num_layers']} layers linear ({', '.join(h['mixers'])}), "
        f"layers {h['linear_layers']}; {h['source']}" + (f", {h['placement']}" if h.get("placement") else "") + ".",
        f"{s['samples']} prompts per probe and context (depths 5%-95%): exact-match accuracy ± binomial standard "
        "error; NLL: mean answer negative log-likelihood per token (nats).", "",
        harness.markdown_table(["probe", "context T", "prompts", "teacher accuracy", "hybrid accuracy", "difference",
                                "teacher NLL", "hybrid NLL", "NLL difference"], rows), "",
        "![recall accuracy vs context](recall_accuracy.png)"]))


def plots(result: dict, out_dir: Path) -> list[str]:
    series = []
    contexts = list(result["settings"]["contexts"])
    for name in ("teacher", "hybrid"):
        by = {(r["probe"], r["context"]): r["accuracy"] for r in result["summary"][name]}
        series += [harness.Series(f"{probe} {name}", contexts, [by.get((probe, c)) for c in contexts], group=probe,
                                  dashed=name == "teacher") for probe in result["settings"]["probes"]]
    k = len(result["hybrid"]["linear_layers"])
    harness.plot_lines(out_dir / "recall_accuracy.png", series,
                       f"Retrieval vs context ({result['settings']['model']}, {k} linear layers; dashed: teacher)",
                       "context T (tokens)", "exact-match accuracy", logx=True, xticks=contexts)
    return ["recall_accuracy.png"]


BENCH = harness.Benchmark("recall", Settings, measure, markdown, plots, check=check,
                          presets={"quick": {"contexts": (256, 512), "samples": 4}})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
