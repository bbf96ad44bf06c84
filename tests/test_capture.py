"""Teacher activation capture: layout, faithfulness to the attention module, reuse, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dtr_core.artifacts import atomic_dir, atomic_path, hash_json, read_json, sha256_file, write_json
from dtr_core.distill.capture import capture_activations, open_layer_activations, read_manifest, verify_capture
from dtr_core.hybrid.surgery import attention_module, decoder_layers, num_layers

N, T = 5, 24  # odd sizes: the last batch of 2 is partial


@pytest.fixture(scope="module")
def teacher():
    from dtr_core.models import load_model

    model, _ = load_model("tiny-llama")
    return model


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 256, (N, T), generator=torch.Generator().manual_seed(1))


def _causal_mask(length: int) -> torch.Tensor:
    mask = torch.full((length, length), float("-inf")).triu(1)
    return mask[None, None]  # (1, 1, T, T) additive, works for eager and sdpa


def test_layout_and_manifest(teacher, token_ids, tmp_path):
    manifest = capture_activations(teacher, token_ids, tmp_path / "act", batch_size=2,
                                   metadata={"corpus": "random bytes"})
    hidden = teacher.config.hidden_size
    layers = list(range(num_layers(teacher)))
    assert manifest["layers"] == layers
    assert manifest["num_tokens"] == N * T and manifest["seq_len"] == T and manifest["dtype"] == "F32"
    assert manifest["shapes"]["inputs"] == [N, T, hidden]
    assert manifest["data"] == {"corpus": "random bytes"}
    assert read_json(tmp_path / "act" / "manifest.json") == manifest
    assert sorted(p.name for p in (tmp_path / "act").iterdir() if not p.name.startswith(".")) == sorted(
        ["manifest.json", "tokens.safetensors"] + [f"layer_{i:03d}.safetensors" for i in layers])
    for name, info in manifest["files"].items():
        assert sha256_file(tmp_path / "act" / name) == info["sha256"]
    assert verify_capture(tmp_path / "act")
    with safe_open(str(tmp_path / "act" / "layer_003.safetensors"), "pt") as f:  # a plain safetensors file
        assert f.get_tensor("inputs").shape == (N, T, hidden)
        assert f.get_tensor("outputs").shape == (N, T, hidden)
        inputs, outputs = open_layer_activations(tmp_path / "act", 3)
        assert torch.equal(f.get_tensor("inputs"), inputs) and torch.equal(f.get_tensor("outputs"), outputs)
    with safe_open(str(tmp_path / "act" / "tokens.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("input_ids"), token_ids)
    assert not list(tmp_path.glob(".act*")), "no temporary folders left behind"


def test_captured_activations_match_direct_attention_calls(teacher, token_ids, tmp_path):
    capture_activations(teacher, token_ids, tmp_path, batch_size=2)
    with torch.no_grad():
        hidden_states = teacher(input_ids=token_ids, output_hidden_states=True).hidden_states
        positions = torch.arange(T).unsqueeze(0)
        rope = teacher.model.rotary_emb(hidden_states[0], positions)
        for i in range(num_layers(teacher)):
            inputs, outputs = open_layer_activations(tmp_path, i)
            expected_in = decoder_layers(teacher)[i].input_layernorm(hidden_states[i])
            torch.testing.assert_close(inputs, expected_in, rtol=1e-5, atol=1e-5)
            direct, _ = attention_module(teacher, i)(hidden_states=inputs, position_embeddings=rope,
                                                     attention_mask=_causal_mask(T))
            torch.testing.assert_close(outputs, direct, rtol=1e-5, atol=1e-5)


def test_half_precision_storage(teacher, token_ids, tmp_path):
    capture_activations(teacher, token_ids, tmp_path / "f32", layers=[1])
    manifest = capture_activations(teacher, token_ids, tmp_path / "bf16", layers=[1], store_dtype=torch.bfloat16)
    assert manifest["dtype"] == "BF16"
    full, _ = open_layer_activations(tmp_path / "f32", 1)
    half, _ = open_layer_activations(tmp_path / "bf16", 1)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16))
    assert (tmp_path / "bf16" / "layer_001.safetensors").stat().st_size < \
        (tmp_path / "f32" / "layer_001.safetensors").stat().st_size


def test_capture_stops_after_last_requested_layer(teacher, token_ids, tmp_path):
    calls = []
    handle = attention_module(teacher, 3).register_forward_hook(lambda *args: calls.append(1))
    try:
        manifest = capture_activations(teacher, token_ids, tmp_path, layers=[2, 0])
    finally:
        handle.remove()
    assert manifest["layers"] == [0, 2]
    assert calls == [], "layers after the last captured one are not run"
    with pytest.raises(ValueError, match="layer 1 was not captured"):
        open_layer_activations(tmp_path, 1)


def test_reuse_and_recapture(teacher, token_ids, tmp_path):
    first = capture_activations(teacher, token_ids, tmp_path, layers=[0, 1])
    stamp = (tmp_path / "layer_000.safetensors").stat().st_mtime_ns
    calls = []
    handle = attention_module(teacher, 0).register_forward_hook(lambda *args: calls.append(1))
    try:
        again = capture_activations(teacher, token_ids, tmp_path, layers=[0, 1], batch_size=3)
    finally:
        handle.remove()
    assert again["reused"] and calls == []
    assert again["content_hash"] == first["content_hash"]
    assert (tmp_path / "layer_000.safetensors").stat().st_mtime_ns == stamp
    # different tokens: a new capture replaces the old one
    other = capture_activations(teacher, token_ids.flip(0), tmp_path, layers=[0, 1])
    assert "reused" not in other and other["content_hash"] != first["content_hash"]
    assert read_manifest(tmp_path)["content_hash"] == other["content_hash"]


@pytest.mark.parametrize("bad, message", [
    (dict(token_ids=torch.zeros(0, T, dtype=torch.long)), "nothing to capture"),
    (dict(token_ids=torch.zeros(2, T)), "LongTensor"),
    (dict(layers=[4]), "out of range"),
    (dict(layers=[]), "layers is empty"),
    (dict(batch_size=0), "batch_size"),
    (dict(store_dtype=torch.int8), "store_dtype"),
], ids=["empty-budget", "float-ids", "layer-out-of-range", "no-layers", "batch-0", "int8-storage"])
def test_bad_input_writes_nothing(teacher, token_ids, tmp_path, bad, message):
    kwargs = dict(token_ids=token_ids, out_dir=tmp_path / "act") | bad
    with pytest.raises(ValueError, match=message):
        capture_activations(teacher, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_capture_leaves_nothing(teacher, token_ids, tmp_path):
    calls = []

    def explode(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    handle = attention_module(teacher, 1).register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_activations(teacher, token_ids, tmp_path / "act", batch_size=2)
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []


def _files(directory) -> list[str]:
    """File names in a folder, without dot-files (the dtr artifact marker)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_artifact_helpers(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"b": 1, "a": [1.5]})
    assert read_json(tmp_path / "a" / "x.json") == {"a": [1.5], "b": 1}
    assert hash_json({"a": 1, "b": 2}) == hash_json({"b": 2, "a": 1}) != hash_json({"a": 1, "b": 3})
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "half.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]
    with atomic_dir(tmp_path / "b") as tmp:
        (tmp / "x.json").write_text(json.dumps(0))
    with atomic_dir(tmp_path / "b") as tmp:  # replaces the whole folder it wrote
        (tmp / "y.json").write_text(json.dumps(1))
    assert _files(tmp_path / "b") == ["y.json"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "b") as tmp:
        (tmp / "z").write_text("")
        raise RuntimeError
    assert _files(tmp_path / "b") == ["y.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("damage", ["truncate", "flip-one-byte", "delete", "garbage-manifest"])
def test_damaged_capture_is_captured_again(teacher, token_ids, tmp_path, caplog, damage):
    first = capture_activations(teacher, token_ids, tmp_path, layers=[0, 1])
    path = tmp_path / ("manifest.json" if damage == "garbage-manifest" else "layer_001.safetensors")
    original = (tmp_path / "layer_001.safetensors").read_bytes()
    if damage == "truncate":
        path.write_bytes(original[: len(original) // 2])
    elif damage == "flip-one-byte":  # same size: only the re-hash sees it
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_text("{ not json")
    assert not verify_capture(tmp_path)
    calls = []
    handle = attention_module(teacher, 0).register_forward_hook(lambda *args: calls.append(1))
    try:
        with caplog.at_level("WARNING", logger="dtr_core.distill.capture"):
            again = capture_activations(teacher, token_ids, tmp_path, layers=[0, 1])
    finally:
        handle.remove()
    assert "reused" not in again and calls, "the teacher ran again"
    assert str(path) in caplog.text
    assert (tmp_path / "layer_001.safetensors").read_bytes() == original
    assert again["content_hash"] == first["content_hash"] and verify_capture(tmp_path)
    assert capture_activations(teacher, token_ids, tmp_path, layers=[0, 1])["reused"]
