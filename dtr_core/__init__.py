"""dtr_core: the DtR library (Distill-then-Replace, arXiv 2601.11667) without Prefect or MLflow.

Linear-attention students (`mixers`, ops in `ops`, layout (B, T, H, D)), model surgery (`surgery`,
`families`), hybrid models that save, load and generate (`hybrid`, `cache`), model sources (`models`),
phase 1 (`capture`, `distill`), task evaluation (`evaluation`) and phase 2 (`greedy`, `scorer`, `search`,
`baselines`), with the whole method as one listing in `reference`.

`import dtr_core.hybrid` registers the hybrid model classes with transformers' Auto classes
(`dtr_core.models.load_model` does it itself). The package itself imports nothing heavy, so checks that
need no model (`dtr_core.preflight`, `dtr_core.redaction`) start without torch or transformers.
"""
