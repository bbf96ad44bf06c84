"""Healing: what end-to-end distillation of a stitched hybrid buys, and what it costs.

For each task and each k, the hybrid with the first k layers of the task's greedy order linear (students from
`--students`) is scored before healing and after healing at each budget (`dtr_core.heal.heal`: KL from the
teacher's next-token distribution on the BBC corpus, the students alone trainable). Each model is scored on
the task's test split, on held-out BBC text as perplexity (`bbc-lm`: so that task-specific healing does not
quietly break language modelling) and on the passkey probe at growing contexts (`benchmarks.recall`); the
table gives the heal's held-out KL before and after, its wall time and tokens/s. Reading the numbers:
docs/BENCHMARKS.md, section "Healing".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks import harness, recall
from benchmarks.harness import int_list, name_list, option

logger = logging.getLogger("benchmarks.healing")


@dataclasses.dataclass(frozen=True)
class Settings:
    students: str = option("", "students folder of a run or of `dtr bench placements` (required)")
    order: str = option("", "greedy order: a JSON file with `swap_order` (placements' greedy_order_<task>.json) "
                        "or comma-separated layers; the same order for every task")
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    mixer: str = option("gated_deltanet", "student type of --students")
    tasks: tuple[str, ...] = option(("sentiment",), "comma-separated tasks", name_list)
    ks: tuple[int, ...] = option((8, 12), "numbers of linear layers (a prefix of the order each)", int_list, minimum=1)
    heal_steps: tuple[int, ...] = option((20, 60), "healing budgets in optimiser steps", int_list, minimum=1)
    heal_lr: float = option(1e-4, "healing learning rate", float)
    heal_batch: int = option(2, "sequences per healing step", minimum=1)
    heal_seq_len: int = option(256, "tokens per healing sequence", minimum=2)
    test_limit: int | None = option(200, "test examples per task (None: the split)", int, minimum=1)
    lm_limit: int = option(40, "held-out BBC articles for perplexity", minimum=1)
    contexts: tuple[int, ...] = option((1024, 2048, 4096), "passkey prompt lengths", int_list, minimum=64)
    samples: int = option(8, "passkey prompts per context", minimum=1)


def swap_order(order: str) -> list[int]:
    """The layers of `--order`: a JSON file holding `swap_order`, or `3,7,12`."""
    if Path(order).is_file():
        return [int(layer) for layer in json.loads(Path(order).read_text())["swap_order"]]
    return list(int_list(order))


def check(s: Settings, preset: str | None) -> Settings:
    from dtr_core.evaluation import get_task

    if not s.students:
        raise ValueError("--students is required: the students folder of a run (runs/<id>/students)")
    harness.check_students(s.students)
    harness.check_mixer(s.mixer)
    if not s.order:
        raise ValueError("--order is required: placements' greedy_order_<task>.json or layers like 3,7,12")
    try:
        order = swap_order(s.order)
    except (ValueError, KeyError) as error:
        raise ValueError(f"--order {s.order}: expected a JSON file with swap_order or layers like 3,7,12") from error
    if max(s.ks) > len(order):
        raise ValueError(f"--ks up to {max(s.ks)} needs an order of at least that many layers; {s.order} has "
                         f"{len(order)}")
    for task in s.tasks:
        get_task(task)  # unknown names raise listing the tasks
    return dataclasses.replace(s, ks=tuple(sorted(set(s.ks))), heal_steps=tuple(sorted(set(s.heal_steps))))


def scores(model, tokenizer, s: Settings, task: str, prompts) -> dict:
    """Test score, held-out BBC perplexity and passkey accuracy per context of one model."""
    from dtr_core.evaluation import evaluate

    test = evaluate(model, tokenizer, task, "test", s.test_limit)
    lm = evaluate(model, tokenizer, "bbc-lm", "test", s.lm_limit)
    passkey = {str(row["context"]): row["accuracy"] for row in recall.summarise(recall.evaluate_model(model, prompts, task))}
    return {"test": test.score, "perplexity": lm.metrics["perplexity"], "passkey": passkey}


def measure(s: Settings) -> dict:
    from dtr_core.distill.corpus import Corpus
    from dtr_core.heal.config import HealConfig
    from dtr_core.heal.training import heal
    from dtr_core.hybrid.build import build_hybrid
    from dtr_core.models import load_model

    teacher, tokenizer = load_model(s.model)
    teacher.eval()
    order = swap_order(s.order)
    prompts = recall.make_prompts(tokenizer, ("passkey",), s.contexts, s.samples, seed=0)
    corpus = Corpus("bbc", tokenizer)
    rows = []
    for task in s.tasks:
        rows.append({"task": task, "k": 0, "steps": 0, **scores(teacher, tokenizer, s, task, prompts)})
        for k in s.ks:
            layers = order[:k]
            hybrid = build_hybrid(teacher, layers, s.mixer, students_dir=s.students)
            rows.append({"task": task, "k": k, "steps": 0, "layers": layers,
                         **scores(hybrid, tokenizer, s, task, prompts)})
            for steps in s.heal_steps:
                hybrid = build_hybrid(teacher, layers, s.mixer, students_dir=s.students)
                config = HealConfig(steps=steps, lr=s.heal_lr, batch_size=s.heal_batch, seq_len=s.heal_seq_len)
                started = time.perf_counter()
                result = heal(teacher, hybrid, corpus, config)
                seconds = time.perf_counter() - started
                logger.info("%s k=%d: healed %d steps in %.0f s, held-out KL %.4f -> %s", task, k, steps, seconds,
                            result.initial_kl, result.final_kl)
                row = {"task": task, "k": k, "steps": steps, "layers": layers, "status": result.status,
                       "initial_kl": result.initial_kl, "final_kl": result.final_kl, "seconds": seconds,
                       "tokens_per_s": result.tokens / max(result.seconds, 1e-9)}
                rows.append({**row, **(scores(hybrid, tokenizer, s, task, prompts) if result.ok else {})})
    return {"order": order, "rows": rows}


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    contexts = [str(c) for c in s["contexts"]]
    rows = []
    for r in result["rows"]:
        passkey = r.get("passkey", {})
        rows.append([r["task"], "teacher" if r["k"] == 0 else r["k"], r["steps"] or "-", _fmt(r.get("test")),
                     _fmt(r.get("perplexity"), 2), *(_fmt(passkey.get(c), 2) for c in contexts),
                     _fmt(r.get("initial_kl"), 4), _fmt(r.get("final_kl"), 4),
                     f"{r['seconds']:.0f} s" if "seconds" in r else "-",
                     f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"])
    tokens = s["heal_batch"] * s["heal_seq_len"]
    return harness.report(f"Healing: {s['model']}, {s['mixer']} students", result, "\n".join([
        f"The first k layers of the greedy order {result['order']} linear; heal budgets in steps of {s['heal_batch']} "
        f"x {s['heal_seq_len']} = {tokens} tokens at lr {s['heal_lr']} (students trainable, KL from the teacher on "
        f"BBC text); steps '-' is the unhealed hybrid. Test score on {s['test_limit'] or 'all'} test examples, "
        f"perplexity on {s['lm_limit']} held-out BBC articles, passkey accuracy on {s['samples']} prompts per context.",
        "", harness.markdown_table(["task", "k", "heal steps", "test score", "BBC perplexity",
                                    *(f"passkey@{c}" for c in contexts), "KL before", "KL after", "heal wall",
                                    "heal tokens/s"], rows)]))


def plots(result: dict, out_dir: Path) -> list[str]:
    names = []
    for task in result["settings"]["tasks"]:
        task_rows = [r for r in result["rows"] if r["task"] == task and r["k"] > 0 and "test" in r]
        series = [harness.Series("unhealed" if steps == 0 else f"healed, {steps} steps",
                                 [r["k"] for r in task_rows if r["steps"] == steps],
                                 [r["test"] for r in task_rows if r["steps"] == steps])
                  for steps in (0, *result["settings"]["heal_steps"])]
        teacher = next(r["test"] for r in result["rows"] if r["task"] == task and r["k"] == 0)
        name = f"healing_{task}.png"
        harness.plot_lines(out_dir / name, series, f"Healing on {task} ({result['settings']['model']})",
                           "linear layers (greedy order)", "test score", hline=teacher)
        names.append(name)
    return names


BENCH = harness.Benchmark("healing", Settings, measure, markdown, plots, check=check,
                          presets={"quick": dict(ks=(1, 2), heal_steps=(2,), heal_batch=1, heal_seq_len=32,
                                                 test_limit=8, lm_limit=2, contexts=(160,), samples=2)})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
