"""A students folder after a heal: the healed students of the healed layers, the earlier students of the rest.

The search that continues from a healed hybrid (`continued_search.py`) scores its candidates with the same
machinery as the ordinary search, which reads students from a folder laid out like `runs/<id>/students/`
(`dtr_core.distill.training`). After heal number n of layers L, `write_healed_students` makes such a folder:

    layer l in L      the student's weights as the heal left them (read from the healed hybrid's safetensors)
    layer l not in L  a copy of the student in the folder the heal started from (distilled, or an earlier heal's)

Each healed layer's `meta.json` keeps its distillation record, with `key` replaced by a hash of the heal's key
and the layer (so scored candidates keyed on students are never confused with the unhealed ones) and
`healed_by` naming the heal. The folder is written atomically; `healed_students.json` inside (written last)
holds the key, so a rerun with the same heal reuses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from dtr_core.artifacts import atomic_dir, hash_json, read_json_record, sha256_file, write_json
from dtr_core.distill.training import META, WEIGHTS, layer_dir, read_layer_results
from dtr_core.hybrid.surgery import attention_prefix

RECORD = "healed_students.json"


def healed_student_weights(hybrid_dir: str | os.PathLike, prefix: str) -> dict:
    """A student's state dict from a saved hybrid folder (its `*.safetensors` files): the tensors under `prefix`
    (its attention's state-dict prefix, e.g. "model.layers.3.self_attn.")."""
    state = {}
    for path in sorted(Path(hybrid_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                if name.startswith(prefix):
                    state[name[len(prefix):]] = weights.get_tensor(name)
    if not state:
        raise ValueError(f"{hybrid_dir} holds no weights under {prefix!r}; is it a dtr hybrid of this teacher?")
    return state


def write_healed_students(teacher: PreTrainedModel, hybrid_dir: str | os.PathLike, layers: list[int],
                          base_students_dir: str | os.PathLike, out_dir: str | os.PathLike, heal_key: str) -> Path:
    """The students folder `out_dir` after the heal `heal_key` of `layers` of `teacher` saved in `hybrid_dir`
    (module docstring); `base_students_dir` is the folder the heal started from. Returns `out_dir`."""
    out_dir = Path(out_dir)
    record = read_json_record(out_dir / RECORD)
    if record is not None and record.get("key") == heal_key:
        return out_dir
    results = read_layer_results(base_students_dir)
    healed = set(layers)
    missing = sorted(healed - {layer for layer, result in results.items() if result.ok})
    if missing:
        raise ValueError(f"no distilled student for healed layers {missing} in {base_students_dir}")
    with atomic_dir(out_dir, kind="students") as staging:
        for layer, result in sorted(results.items()):
            source, target = layer_dir(base_students_dir, layer), layer_dir(staging, layer)
            if layer not in healed:
                shutil.copytree(source, target)
                continue
            meta = read_json_record(source / META) or {}
            target.mkdir(parents=True)
            state = {name: tensor.contiguous() for name, tensor in
                     healed_student_weights(hybrid_dir, attention_prefix(teacher, layer)).items()}
            save_file(state, str(target / WEIGHTS), metadata={"mixer": result.mixer, "layer": str(layer)})
            write_json(target / META, {**meta, "key": hash_json({"heal": heal_key, "layer": layer}),
                                       "healed_by": heal_key, "weights_sha256": sha256_file(target / WEIGHTS)})
        write_json(staging / RECORD, {"key": heal_key, "healed_layers": sorted(healed),
                                      "base_students": str(base_students_dir), "hybrid": str(hybrid_dir)})
    return out_dir
