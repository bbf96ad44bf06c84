"""Long-context recall probe: teacher vs a DtR hybrid on synthetic retrieval at growing context (issue 5, section 3).

Linear-attention layers keep a fixed-size state, so they are where exact recall of a far-away token can be
lost; task accuracy at short prompts does not show it. Two synthetic tasks, each prompt exactly T tokens:
- `passkey`: filler sentences ("The grass is green. The sky is blue. ...") with one needle
  "The pass key is 48213. Remember it. 48213 is the pass key." at the sentence boundary nearest a depth spread
  evenly over the samples (from 5% to 95% of the filler), then "What is the pass key? The pass key is" -> " 48213";
- `kv`: filler-free lines "The code for <name> is <5 digits>." for as many names as fit in T tokens, then
  "What is the code for <name>? The code for <name> is" for one of them, at a depth spread over the samples.
The answer is scored by teacher forcing: correct when the model's greedy next token is the answer's token at
every answer position (exactly what greedy decoding would produce). Also reported: the mean negative
log-likelihood per answer token (nats), which moves before accuracy does. Prompts are built from
separately tokenised pieces so their length is exact; numbers, names and depths come from a seeded
generator, the same for every model.

Contenders (measured in the same run, on the same prompts): the teacher, and one hybrid:
`--hybrid DIR` (a saved hybrid, e.g. `runs/<id>/hybrids/opt`: M_opt), else the teacher with `--layers`
(e.g. M_opt's layers) or `--k` evenly interleaved layers made linear with students from `--students DIR`,
else with students distilled here with a small budget (`benchmarks.placements.ensure_students`, reused).

    python -m benchmarks.recall [--quick] [--json] [--out DIR] [--hybrid DIR | --students DIR [--layers 3,7 | --k 8]]
        [--contexts 256,512,1024,2048,4096] [--samples 16]
    dtr bench recall [same options]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import common

logger = logging.getLogger("benchmarks.recall")

DEFAULT_OUT = common.REPO_ROOT / "docs" / "bench" / "recall"
DEFAULT_CONTEXTS = (256, 512, 1024, 2048, 4096)
QUICK_CONTEXTS = (256, 512)
PROBES = ("passkey", "kv")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Louis",
         "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rachel", "Simon", "Tina", "Victor", "Wendy", "Xavier",
         "Yvonne", "Zoe")


@dataclass(frozen=True)
class Settings:
    model: str
    contexts: tuple[int, ...]
    samples: int
    probes: tuple[str, ...]
    hybrid: str | None
    students: str | None
    layers: tuple[int, ...] | None
    k: int | None
    work_dir: str
    seed: int
    threads: int
    quick: bool
    distill_tokens: int | None = None  # budget of the students distilled here (None: placements' default)
    distill_seq_len: int | None = None
    distill_steps: int | None = None


@dataclass(frozen=True)
class Prompt:
    probe: str
    context: int
    depth: float
    ids: tuple[int, ...]  # the whole prompt, exactly `context` tokens (BOS included when the tokenizer has one)
    answer: tuple[int, ...]  # answer tokens, scored by teacher forcing
    answer_text: str


# --- prompts -------------------------------------------------------------------------------------


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
    model.eval()
    rows, started = [], time.perf_counter()
    for prompt in prompts:
        rows.append({"probe": prompt.probe, "context": prompt.context, "depth": prompt.depth,
                     **score_prompt(model, prompt)})
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


def build_contender(teacher, tokenizer, settings: Settings) -> tuple[object, dict]:
    """The hybrid to compare and a description of it."""
    from dtr_core.hybrid import layer_map, make_hybrid
    from dtr_core.models import load_model
    from dtr_core.surgery import num_layers

    if settings.hybrid is not None:
        hybrid, _ = load_model(settings.hybrid)
        kinds = layer_map(hybrid)
        linear = [i for i, kind in enumerate(kinds) if kind != "full"]
        from benchmarks.placements import display_path

        return hybrid.eval(), {"source": f"saved hybrid {display_path(settings.hybrid)}", "linear_layers": linear,
                               "mixers": sorted(set(kinds) - {"full"})}
    L = num_layers(teacher)
    if settings.layers is not None:
        layers, placement = sorted(settings.layers), "given layers"
    else:
        from dtr_core.baselines import uniform_layers

        k = settings.k if settings.k is not None else L // 4
        layers, placement = list(uniform_layers(L, k)), f"uniform k={k}"
    if any(not 0 <= layer < L for layer in layers):
        raise ValueError(f"--layers {layers} out of range for a {L}-layer model")
    students_dir = settings.students
    source = "given students"
    if students_dir is None:
        from benchmarks import placements

        budget = placements.QUICK if settings.quick else {}
        tokens = settings.distill_tokens or budget.get("distill_tokens", placements.DISTILL_TOKENS)
        seq_len = settings.distill_seq_len or budget.get("distill_seq_len", placements.DISTILL_SEQ_LEN)
        steps = settings.distill_steps or budget.get("distill_steps", placements.DISTILL_STEPS)
        info = placements.ensure_students(teacher, tokenizer, settings.model, "gated_deltanet", settings.work_dir,
                                          layers, tokens, seq_len, steps)
        students_dir = info["dir"]
        source = f"students distilled here ({tokens} tokens in sequences of {seq_len}, {steps} steps)"
    from dtr_core.distill import load_students

    students = load_students(students_dir, teacher, layers=layers)
    missing = sorted(set(layers) - set(students))
    if missing:
        raise ValueError(f"no usable student for layers {missing} in {students_dir}")
    hybrid = make_hybrid(teacher, students)
    from benchmarks.placements import display_path

    return hybrid, {"source": f"{source}: {display_path(students_dir)}", "placement": placement, "linear_layers": layers,
                    "mixers": sorted({s.name for s in students.values()})}


# --- whole run -----------------------------------------------------------------------------------


def run(settings: Settings, argv: Sequence[str]) -> dict:
    from dtr_core.models import load_model
    from dtr_core.surgery import num_layers

    started = time.perf_counter()
    machine = common.machine_info()
    teacher, tokenizer = load_model(settings.model)
    teacher.eval()
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and max(settings.contexts) + 8 > limit:
        raise ValueError(f"context {max(settings.contexts)} exceeds the model's {limit} positions")
    prompts = make_prompts(tokenizer, settings.probes, settings.contexts, settings.samples, settings.seed)
    hybrid, description = build_contender(teacher, tokenizer, settings)
    # warm-up: one short prompt per model (first-call allocations), not scored
    for model in (teacher, hybrid):
        score_prompt(model, prompts[0])
    results = {name: evaluate_model(model, prompts, name) for name, model in (("teacher", teacher),
                                                                              ("hybrid", hybrid))}
    return {
        "benchmark": "recall",
        "settings": asdict(settings),
        "commands": common.command_lines("benchmarks.recall", "recall", argv),
        "machine": machine,
        "num_layers": num_layers(teacher),
        "hybrid": description,
        "answers": [{"probe": p.probe, "context": p.context, "depth": p.depth, "answer": p.answer_text,
                     "answer_tokens": len(p.answer)} for p in prompts],
        "per_prompt": results,
        "summary": {name: summarise(rows) for name, rows in results.items()},
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_time_s": time.perf_counter() - started,
    }


# --- report --------------------------------------------------------------------------------------


def paragraph(result: dict) -> str:
    teacher = {(r["probe"], r["context"]): r for r in result["summary"]["teacher"]}
    hybrid = {(r["probe"], r["context"]): r for r in result["summary"]["hybrid"]}
    k = len(result["hybrid"]["linear_layers"])
    parts = []
    for probe in result["settings"]["probes"]:
        keys = sorted(key for key in teacher if key[0] == probe)
        gaps = [(key[1], teacher[key]["accuracy"] - hybrid[key]["accuracy"]) for key in keys]
        t_mean = sum(teacher[key]["accuracy"] for key in keys) / len(keys)
        h_mean = sum(hybrid[key]["accuracy"] for key in keys) / len(keys)
        worst = max(gaps, key=lambda g: g[1])
        text = (f"{probe}: the teacher retrieves {t_mean:.0%} of answers on average over the contexts, the hybrid "
                f"with {k} of {result['num_layers']} layers linear {h_mean:.0%}")
        if worst[1] > 0:
            text += f"; the largest loss is {worst[1]:.0%} at T={worst[0]}"
        lost = [context for context, gap in gaps if hybrid[(probe, context)]["accuracy"] == 0
                and teacher[(probe, context)]["accuracy"] > 0]
        if lost:
            text += f"; the hybrid retrieves nothing at T={', '.join(map(str, lost))} where the teacher still does"
        nll_gap = [hybrid[key]["nll"] - teacher[key]["nll"] for key in keys]
        mean_gap = sum(nll_gap) / len(nll_gap)
        text += (f". The hybrid's answer NLL is {abs(mean_gap):.2f} nats per token "
                 f"{'higher' if mean_gap >= 0 else 'lower'} than the teacher's on average")
        parts.append(text + ".")
    weak = [f"{probe} T={context}" for (probe, context), r in teacher.items() if r["accuracy"] < 0.5]
    if weak:
        parts.append("The teacher itself is below 50% at " + ", ".join(weak) + ": a small model's own limit, where "
                     "the probe says little about the hybrid.")
    parts.append("Where dtr falls short: these are the recall losses that the task accuracy of the placement "
                 "benchmark does not show; the greedy search never sees long prompts, so a hybrid chosen for a "
                 "short-prompt task can lose long-range retrieval.")
    return " ".join(parts)


def markdown_report(result: dict) -> str:
    s = result["settings"]
    h = result["hybrid"]
    env = common.environment_markdown(result["machine"], result["commands"], {
        "load average at end": result["load_average_end"],
        "wall time of the run": f"{result['wall_time_s'] / 60:.1f} min",
    })
    teacher = {(r["probe"], r["context"]): r for r in result["summary"]["teacher"]}
    rows = []
    for r in result["summary"]["hybrid"]:
        t = teacher[(r["probe"], r["context"])]
        rows.append([r["probe"], str(r["context"]), str(r["n"]), f"{t['accuracy']:.2f} ± {t['stderr']:.2f}",
                     f"{r['accuracy']:.2f} ± {r['stderr']:.2f}", f"{r['accuracy'] - t['accuracy']:+.2f}",
                     f"{t['nll']:.2f}", f"{r['nll']:.2f}"])
    return "\n".join([
        f"# Long-context recall: {s['model']} teacher vs hybrid", "",
        env, "",
        f"Hybrid: {len(h['linear_layers'])} of {result['num_layers']} layers linear ({', '.join(h['mixers'])}), "
        f"layers {h['linear_layers']}; {h['source']}" + (f", {h['placement']}" if h.get("placement") else "") + ".",
        f"{s['samples']} prompts per probe and context (depths 5%-95%), exact-match accuracy of the greedy answer ± "
        "its binomial standard error; NLL: mean answer negative log-likelihood per token (nats). Teacher measured "
        "in this run on the same prompts.", "",
        common.markdown_table(["probe", "context T", "prompts", "teacher accuracy", "hybrid accuracy", "difference",
                               "teacher NLL", "hybrid NLL"], rows),
        "",
        paragraph(result), "",
        "![recall accuracy vs context](recall_accuracy.png)", "",
        f"_`{result['commands']['dtr']}`; {result['machine']['cpu_model']}, load {result['machine']['load_average']}_",
        "",
    ])


def write_plot(result: dict, out_dir: Path) -> str:
    series = []
    contexts = list(result["settings"]["contexts"])
    for name in ("teacher", "hybrid"):
        by = {(r["probe"], r["context"]): r["accuracy"] for r in result["summary"][name]}
        for probe in result["settings"]["probes"]:
            series.append(common.Series(f"{probe} {name}", contexts, [by.get((probe, c)) for c in contexts],
                                        group=probe, dashed=name == "teacher"))
    k = len(result["hybrid"]["linear_layers"])
    common.plot_lines(out_dir / "recall_accuracy.png", series,
                      f"Retrieval vs context ({result['settings']['model']}, {k} linear layers; dashed: teacher)",
                      "context T (tokens)", "exact-match accuracy", logx=True, xticks=contexts)
    return "recall_accuracy.png"


# --- command line --------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        value = int(part[:-1]) * 1024 if part.endswith("K") else int(part)
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtr bench recall", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS}, 4 prompts each, students "
                        "from the quick placement budget (< 2 min on an idle machine)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for recall.{md,json} and the plot")
    parser.add_argument("--model", default="smollm2-135m", help="teacher: a dtr_core.models.load_model source")
    parser.add_argument("--hybrid", default=None, help="a saved hybrid folder (e.g. runs/<id>/hybrids/opt)")
    parser.add_argument("--students", default=None, help="students folder (runs/<id>/students); default: distil "
                        "the needed layers here with a small budget")
    parser.add_argument("--layers", type=_int_list, default=None, help="linear layers, e.g. M_opt's: 3,7,12")
    parser.add_argument("--k", type=int, default=None, help="else: k evenly interleaved linear layers (default L/4)")
    parser.add_argument("--contexts", type=_int_list, default=None,
                        help=f"prompt lengths, K = 1024 (default {','.join(map(str, DEFAULT_CONTEXTS))})")
    parser.add_argument("--samples", type=int, default=None, help="prompts per probe and context (default 16)")
    parser.add_argument("--probes", default=",".join(PROBES), help="comma-separated: passkey, kv")
    parser.add_argument("--work-dir", default=str(common.REPO_ROOT / "runs" / "bench"),
                        help="where students distilled here live (shared with dtr bench placements)")
    parser.add_argument("--distill-tokens", type=int, default=None,
                        help="students distilled here: teacher tokens (default: dtr bench placements')")
    parser.add_argument("--distill-seq-len", type=int, default=None,
                        help="students distilled here: tokens per training sequence (default: placements')")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="students distilled here: steps per layer (default: placements')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    probes = tuple(p.strip() for p in args.probes.split(",") if p.strip())
    unknown = sorted(set(probes) - set(PROBES))
    if unknown or not probes:
        raise ValueError(f"unknown probes {unknown or probes}; choose from: {', '.join(PROBES)}")
    if args.hybrid is not None and (args.students or args.layers or args.k):
        raise ValueError("--hybrid is a complete model: do not combine it with --students, --layers or --k")
    if args.layers is not None and args.k is not None:
        raise ValueError("give --layers or --k, not both")
    distill = {"--distill-tokens": args.distill_tokens, "--distill-seq-len": args.distill_seq_len,
               "--distill-steps": args.distill_steps}
    given = [name for name, value in distill.items() if value is not None]
    if given and (args.hybrid or args.students):
        raise ValueError(f"{', '.join(given)} set(s) the budget of students distilled here; "
                         "drop it, or drop --hybrid/--students")
    samples = args.samples if args.samples is not None else (4 if args.quick else 16)
    contexts = tuple(sorted(set(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS))))
    for name, value in (("--samples", samples), ("--k", args.k), ("--threads", args.threads),
                        ("--contexts", min(contexts)), *distill.items()):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Settings(model=args.model, contexts=contexts, samples=samples, probes=probes, hybrid=args.hybrid,
                    students=args.students, layers=args.layers, k=args.k, work_dir=args.work_dir, seed=args.seed,
                    threads=torch.get_num_threads(), quick=args.quick, distill_tokens=args.distill_tokens,
                    distill_seq_len=args.distill_seq_len, distill_steps=args.distill_steps)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    settings = settings_from_args(args)
    result = run(settings, argv)
    common.publish(args.out, "recall", result, [write_plot(result, Path(args.out))], markdown_report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
