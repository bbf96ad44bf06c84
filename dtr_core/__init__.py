"""dtr_core: the DtR library (Distill-then-Replace, arXiv 2601.11667) without Prefect or MLflow.

One folder per phase of the method, next to the pieces they share:

- `distill/`: phase 1, blockwise local distillation (corpus, the streamed teacher, training of students in blocks);
- `search/`: phase 2, greedy replacement (decisions, scorer, evaluators, acceptance, baselines, and the
  whole method as one listing in `search/reference.py`);
- `hybrid/`: hybrid models (surgery, model classes, decode cache, build, export);
- `mixers/` (the linear-attention students) on `ops/` (their recurrences, layout (B, T, H, D));
- `evaluation/`: tasks and their scoring; `speed.py`: prefill/decode speed and cache size;
- `models.py` (model sources), `families.py` (the supported decoder families), `preflight.py` (input checks
  before any work), `artifacts.py` (atomic writes, hashes, the dtr artifact marker), `run_layout.py` (one
  run folder's paths), `run_lock.py`, `redaction.py`.

`import dtr_core.hybrid` registers the hybrid model classes with transformers' Auto classes
(`dtr_core.models.load_model` does it itself). The package itself imports nothing heavy, so checks that
need no model (`dtr_core.preflight`, `dtr_core.redaction`) start without torch or transformers.
"""
