"""A block killed with SIGKILL resumes from its checkpoint bit for bit; disk use does not grow with the budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from safetensors.torch import load_file

from distill_support import write_corpus

ROOT = Path(__file__).resolve().parents[1]

# Runs one block of layers 1-2 of tiny-llama; argv: corpus, students_dir, steps, pause per step (seconds).
SCRIPT = textwrap.dedent("""
    import logging, sys, time
    import torch
    from dtr_core.distill.block import distill_block
    from dtr_core.distill.config import RANDOM_TEACHER_MAX_NORMALIZED_LOSS, DistillConfig
    from dtr_core.distill.corpus import Corpus
    from dtr_core.models import load_model

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.set_num_threads(1)
    corpus_path, students_dir, steps, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    model, tokenizer = load_model("tiny-llama")
    config = DistillConfig.for_steps(steps, batch_size=2, seq_lens=(32,), eval_sequences=2,
                                     checkpoint_every_steps=3,
                                     max_normalized_loss=RANDOM_TEACHER_MAX_NORMALIZED_LOSS)
    results = distill_block(model, [1, 2], "gla", config, Corpus(corpus_path, tokenizer), students_dir,
                            progress=lambda *args: time.sleep(pause))
    print("done", [r.status for r in results])
""")


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _tensors(folder: Path, layer: int) -> dict[str, bytes]:
    tensors = load_file(str(folder / f"layer_{layer:03d}" / "weights.safetensors"))
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


def _bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(tmp_path):
    corpus = write_corpus(tmp_path / "text.txt")
    whole = _run([corpus, str(tmp_path / "whole"), "12", "0"])
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    victim = _run([corpus, str(tmp_path / "cut"), "12", "0.3"])
    state = tmp_path / "cut" / "block_001-002" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.exists() and victim.poll() is None, victim.communicate()[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not any((tmp_path / "cut").glob("layer_*"))
    rerun = _run([corpus, str(tmp_path / "cut"), "12", "0"])
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming from the checkpoint at step" in err
    for layer in (1, 2):
        assert _tensors(tmp_path / "whole", layer) == _tensors(tmp_path / "cut", layer)
    assert not (tmp_path / "cut" / "block_001-002").exists()


def test_disk_use_does_not_grow_with_the_token_budget(tmp_path):
    corpus = write_corpus(tmp_path / "text.txt", documents=10)  # a small corpus: the long run repeats it
    sizes = {}
    for steps in (4, 40):
        folder = tmp_path / f"steps{steps}"
        process = _run([corpus, str(folder), str(steps), "0"])
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        sizes[steps] = _bytes(folder)
    assert "repeats: epoch 2" in err  # 40 steps read the corpus more than once
    assert sizes[4].keys() == sizes[40].keys()
    weights = [name for name in sizes[4] if name.endswith("weights.safetensors")]
    assert len(weights) == 2 and all(sizes[4][name] == sizes[40][name] for name in weights)
    # meta.json differs only by a few digits and loss-curve points (about 10 whatever the steps)
    assert abs(sum(sizes[40].values()) - sum(sizes[4].values())) < 4096
