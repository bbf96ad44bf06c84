"""Hybrid models: surgery on the teacher (`surgery`), the hybrid model classes (`model`, whose decode cache
is `dtr_core.mixers.state_cache`), building a hybrid from a layer set (`build`) and exporting a searched one
(`export`).

Importing `dtr_core.hybrid` registers the hybrid model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads a saved hybrid.
"""

from dtr_core.hybrid import model as _model  # noqa: F401  (registers dtr_<family> with the Auto classes)
