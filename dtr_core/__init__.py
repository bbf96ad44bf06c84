"""dtr_core: the DtR library (Distill-then-Replace, arXiv 2601.11667) without Prefect or MLflow.

Linear-attention students (`mixers`, ops in `ops`, layout (B, T, H, D)), model surgery (`surgery`,
`families`), hybrid models that save, load and generate (`hybrid`, `cache`), model sources (`models`),
phase 1 (`capture`, `distill`), task evaluation (`evaluation`) and phase 2 (`greedy`, `search`,
`baselines`), with the whole method as one listing in `reference`.

Importing `dtr_core` registers the hybrid model classes with transformers' Auto classes.
"""

from dtr_core import hybrid as _hybrid  # noqa: F401  (registers dtr_<family> with AutoConfig / AutoModelForCausalLM)
