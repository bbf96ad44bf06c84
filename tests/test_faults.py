"""`dtr convert` under real faults, as real processes: SIGKILL at every stage, a disk that fills up, a run
folder that turns read-only.

Every run is `dtr convert --profile smoke` on a perplexity task (`bbc-lm`: continuous scores, and M_best
differs from M_opt, so two hybrids are exported and registered), with a budget that makes each stage
last long enough to be hit by polling the run folder (`BUDGET`: 48 steps of 4 x 32 tokens, about a second
per layer, one layer per task, a block checkpoint every 8 steps). One uninterrupted run is the reference.

- killed at a stage (the whole process group, so the temporary Prefect server dies too) and run again with
  the same command: the re-run exits 0 with the reference's search trajectory and scores, bit-identical
  hybrid tensors, one registered version per distinct hybrid, and no MLflow run left RUNNING;
- the disk fills up while layers distil (after a block's first checkpoint): exit 1, one `error:` line naming the folder and "no space", the
  MLflow run FAILED; the run folder, copied to a roomy disk, resumes to the reference's result;
- the run folder turns read-only while layers distil: exit 1, one `error:` line, the MLflow run FAILED.

The disk faults mount tmpfs file systems (root only; skipped with the reason elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from pipeline_support import cli_env, wait_for

# 12 `dtr convert` processes of 30-70 s each (every one starts its own Prefect server): 9-14 minutes on the
# project's 2-core machine, past the default selection's budget
pytestmark = pytest.mark.slow

DTR = Path(sys.executable).parent / "dtr"
RUN_ID = "faults"
NUM_LAYERS = 4  # tiny-llama
BUDGET = ["--profile", "smoke", "--task", "bbc-lm", "--distill-tokens", str(48 * 4 * 32), "--seq-len", "32",
          "--layers-per-task", "1", "--checkpoint-every-steps", "8", "--val-limit", "16", "--test-limit", "16",
          "--context-len", "64", "--decode-tokens", "4"]
MODEL_NAME = "dtr-tiny-llama-bbc-lm"
POLL = 0.02  # seconds between looks at the run folder; every stage window is ~50x longer


# --- running dtr convert -----------------------------------------------------------------------------------

def _env(uri: str) -> dict[str, str]:
    return cli_env(CI="true", MLFLOW_TRACKING_URI=uri)


@dataclass
class Workspace:
    """One conversion's folders: the output dir (the run folder inside), the MLflow store, each attempt's
    output (`out-N.txt`, `err-N.txt`)."""

    root: Path
    output_dir: Path | None = None  # default: root/runs
    uri: str = ""  # default: a sqlite store in root
    attempts: list[subprocess.CompletedProcess] = field(default_factory=list)

    def __post_init__(self):
        self.output_dir = self.output_dir or self.root / "runs"
        self.uri = self.uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def run(self) -> Path:
        return self.output_dir / RUN_ID

    @property
    def args(self) -> list[str]:
        return [str(DTR), "convert", *BUDGET, "--output-dir", str(self.output_dir), "--run-id", RUN_ID]

    def start(self) -> subprocess.Popen:
        """Start an attempt in a process group of its own; `finish` records how it ended."""
        n = len(self.attempts)
        self.attempts.append(subprocess.CompletedProcess(self.args, None))  # filled in when it ends
        with open(self.root / f"out-{n}.txt", "w") as out, open(self.root / f"err-{n}.txt", "w") as err:
            process = subprocess.Popen(self.args, cwd=self.root, env=_env(self.uri), start_new_session=True,
                                       stdout=out, stderr=err)
        process.attempt = n
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for `process` (killing its group after `timeout`); its exit code and output."""
        try:
            process.wait(timeout=timeout)
        finally:
            _kill_group(process)
        n = process.attempt
        self.attempts[n] = subprocess.CompletedProcess(process.args, process.returncode,
                                                       (self.root / f"out-{n}.txt").read_text(),
                                                       (self.root / f"err-{n}.txt").read_text())
        return self.attempts[n]

    def complete(self) -> subprocess.CompletedProcess:
        done = self.finish(self.start())
        assert done.returncode == 0, done.stderr[-3000:]
        return done


def _kill_group(process: subprocess.Popen) -> list[int]:
    """SIGKILL the process group `process` leads (the CLI and everything it started), then reap it. Returns
    the descendants that were not in the group (a server started in a session of its own) and survived:
    they are killed one by one.

    The group is signalled only while its leader is unreaped (so its id cannot have been reused).
    """
    import psutil

    survivors = []
    if process.poll() is None:
        try:
            family = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for child in family:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(child.pid)
                    child.kill()
            except psutil.NoSuchProcess:
                pass
    process.wait()
    return survivors


def _wait_for(predicate: Callable[[], bool], seconds: float, process: subprocess.Popen | None = None) -> bool:
    return wait_for(predicate, seconds, process, poll=POLL)


# --- what a finished run holds -----------------------------------------------------------------------------

def _tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every tensor in a hybrid's safetensors files (dtype, shape, bytes): not of the files, whose
    metadata order may vary."""
    from safetensors import safe_open

    from dtr_core.artifacts import hash_tensor

    hashes = {}
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder} holds no safetensors file"
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                hashes[f"{path.name}:{name}"] = hash_tensor(handle.get_tensor(name))
    return hashes


def _result(run: Path) -> dict[str, Any]:
    """What a conversion decided: the search trajectory (every candidate's score), the rows' layers and
    scores, and every hybrid tensor's hash. Timings and paths left out."""
    from dtr_core.artifacts import read_json

    summary = read_json(run / "summary.json")
    rows = [{key: row[key] for key in ("model", "linear_layers", "num_linear", "validation", "test", "cache_bytes")}
            for row in summary["rows"]]
    return {"trajectory": read_json(run / "greedy" / "trajectory.json"), "rows": rows,
            "decision": {key: summary[key] for key in ("swap_order", "p_min", "stop_reason", "rounds",
                                                       "failed_layers", "num_layers")},
            "tensors": {role: _tensor_hashes(run / "hybrids" / role) for role in ("best", "opt")}}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(uri: str, run: Path) -> list:
    from mlflow.entities import ViewType

    from dtr_core.artifacts import read_json

    experiment_id = read_json(run / "mlflow_run.json")["experiment_id"]
    return _client(uri).search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=5000)


def _parent_status(uri: str, run: Path) -> str:
    from dtr_core.artifacts import read_json

    return _client(uri).get_run(read_json(run / "mlflow_run.json")["run_id"]).info.status


def _check_registry(uri: str, run: Path) -> None:
    """One version per distinct hybrid, each alias on the version holding its hybrid's weights."""
    from tasks.registry import HASH_TAG, weights_sha256

    client = _client(uri)
    weights = {role: weights_sha256(run / "hybrids" / role) for role in ("best", "opt")}
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(v.tags.get(HASH_TAG) for v in versions) == sorted(set(weights.values())), \
        [(v.version, v.tags) for v in versions]
    for role, digest in weights.items():
        assert client.get_model_version_by_alias(MODEL_NAME, role).tags[HASH_TAG] == digest, role


def _check_tracking(uri: str, run: Path) -> None:
    """One parent run, FINISHED; no run of the experiment left RUNNING."""
    runs = _runs(uri, run)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in parents]
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def _leftovers(run: Path) -> list[str]:
    """Temporary files and folders of atomic writes (`dtr_core.artifacts`) left in the run folder."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    """One uninterrupted `dtr convert` with `BUDGET`: its result (`_result`)."""
    space = Workspace(tmp_path_factory.mktemp("reference"))
    space.complete()
    _check_registry(space.uri, space.run)
    _check_tracking(space.uri, space.run)
    result = _result(space.run)
    assert result["rows"][1]["linear_layers"] != result["rows"][2]["linear_layers"], \
        "M_best = M_opt: the registration checks would cover one hybrid only"
    return result


# --- SIGKILL at every stage --------------------------------------------------------------------------------

def _metas(run: Path) -> list[Path]:
    return list(run.glob("students/layer_*/meta.json"))


def _exported(run: Path) -> list[Path]:
    return list(run.glob("hybrids/*/dtr_export.json"))


def _checkpoints(run: Path) -> list[Path]:
    return list(run.glob("students/block_*/checkpoint/state.json"))


def _in_first_blocks(run: Path) -> bool:
    """A block has checkpointed mid-training and no layer is written yet."""
    return bool(_checkpoints(run)) and not _metas(run)


def _in_distillation(run: Path) -> bool:
    return 0 < len(_metas(run)) < NUM_LAYERS


def _in_search(run: Path) -> bool:
    return any(run.glob("greedy/candidates/*.json")) and not (run / "greedy" / "trajectory.json").exists()


def _in_export(run: Path) -> bool:
    return (run / "greedy" / "trajectory.json").exists() and not _exported(run)


def _versions(db: Path) -> int | None:
    """Registered model versions in the sqlite store; None when the store cannot be read yet."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)) as connection:
            return connection.execute("SELECT count(*) FROM model_versions").fetchone()[0]
    except sqlite3.Error:
        return None


@dataclass
class Outcome:
    stage: str
    space: Workspace
    at_kill: dict[str, Any]
    rerun: subprocess.CompletedProcess


def _kill_in(space: Workspace, stage: str) -> dict[str, Any]:
    """Start the run, SIGKILL its process group once `stage` is under way; what the folder held then."""
    run, db = space.run, space.root / "mlflow.db"
    predicates = {"mid-block": _in_first_blocks, "distillation": _in_distillation, "search": _in_search,
                  "export": _in_export}
    survivors: list[int] = []
    process = space.start()
    try:
        if stage == "registration":
            # after the first version is registered, before summary.json: the test holds the store's write
            # lock while it kills, so the run cannot get past its next write (the alias) in between
            hit = _wait_for(lambda: len(_exported(run)) == 2 and not (run / "summary.json").exists()
                            and _hold_when_registered(db, process, survivors), 300, process)
        else:
            hit = _wait_for(lambda: predicates[stage](run), 300, process)
            if hit:
                survivors += _kill_group(process)
    finally:
        _kill_group(process)
    assert hit, f"never saw the run in its {stage} stage (exit code {process.returncode})"
    assert not survivors, f"processes the run started outlived its killed group: {survivors}"
    space.attempts[process.attempt].returncode = process.returncode
    return {"metas": len(_metas(run)), "candidates": len(list(run.glob("greedy/candidates/*.json"))),
            "trajectory": (run / "greedy" / "trajectory.json").exists(), "exported": len(_exported(run)),
            "checkpoints": len(_checkpoints(run)), "summary": (run / "summary.json").exists(),
            "versions": _versions(db), "parent": _parent_status(space.uri, run), "leftovers": _leftovers(run)}


def _hold_when_registered(db: Path, process: subprocess.Popen, survivors: list[int]) -> bool:
    """Take the store's write lock; with a registered version there, SIGKILL `process`'s group under it."""
    try:
        connection = sqlite3.connect(db, timeout=0.05, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        connection.execute("BEGIN IMMEDIATE")  # no other writer until the ROLLBACK
        if connection.execute("SELECT count(*) FROM model_versions").fetchone()[0] == 0:
            return False
        survivors += _kill_group(process)
        return True
    except sqlite3.Error:  # locked by the run, or the tables are not there yet
        return False
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


STAGES = ["mid-block", "distillation", "search", "export", "registration"]


@pytest.fixture(scope="module", params=STAGES)
def killed(request, tmp_path_factory) -> Outcome:
    """A run SIGKILLed in `stage`, then the same command run again to the end."""
    space = Workspace(tmp_path_factory.mktemp(f"kill-{request.param}"))
    at_kill = _kill_in(space, request.param)
    return Outcome(request.param, space, at_kill, space.finish(space.start()))


def test_kill_lands_in_its_stage(killed):
    """The folder at the kill shows the stage really was under way (the other checks mean something)."""
    state, stage = killed.at_kill, killed.stage
    assert not state["summary"]
    if stage == "mid-block":
        assert state["checkpoints"] > 0 and state["metas"] == 0
    elif stage == "distillation":
        assert 0 < state["metas"] < NUM_LAYERS and state["candidates"] == 0
    elif stage == "search":
        assert state["metas"] == NUM_LAYERS and state["candidates"] > 0 and not state["trajectory"]
    elif stage == "export":
        assert state["trajectory"] and state["exported"] == 0
    else:
        assert state["exported"] == 2 and state["versions"] >= 1


def test_killed_run_resumes_to_the_uninterrupted_result(killed, reference):
    assert killed.rerun.returncode == 0, killed.rerun.stderr[-3000:]
    result = _result(killed.space.run)
    assert result["tensors"] == reference["tensors"], "the hybrids' tensors differ from the uninterrupted run's"
    assert result == reference


def test_killed_run_registers_each_hybrid_once_and_leaves_no_run_running(killed):
    assert killed.rerun.returncode == 0, killed.rerun.stderr[-3000:]
    _check_registry(killed.space.uri, killed.space.run)
    _check_tracking(killed.space.uri, killed.space.run)


def test_killed_run_is_not_finished_in_mlflow(killed, request):
    """Until summary.json is written the MLflow parent run is RUNNING: a run killed before is not FINISHED."""
    assert killed.at_kill["parent"] == "RUNNING"


def test_killed_run_leaves_no_temporary_files_once_resumed(killed, request):
    """Once resumed, the run folder holds no temporary file or folder of an atomic write, the killed attempt's
    included."""
    assert killed.rerun.returncode == 0, killed.rerun.stderr[-3000:]
    assert _leftovers(killed.space.run) == []


# --- the disk fills up; the run folder turns read-only -----------------------------------------------------

def _mount_tmpfs(folder: Path, megabytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
    except OSError as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")


def _mounted(folder: Path) -> bool:
    """Something is mounted on `folder` (a bind mount of a folder onto itself included, which
    `os.path.ismount` does not see)."""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == str(folder) for line in mounts)


def _unmount_all(*folders: Path) -> None:
    """Unmount every mount on `folders`, innermost first."""
    for folder in folders:
        while _mounted(folder):
            subprocess.run(["umount", str(folder)], check=True, capture_output=True, text=True)


def _fill(folder: Path) -> int:
    """Write a file into `folder` until its file system is full; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(folder / "filler.bin", "wb", buffering=0) as handle:
        try:
            while True:
                written += handle.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return written


def _error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def _run_until_fault(space: Workspace, fault: Callable[[], None]) -> tuple[subprocess.CompletedProcess, str]:
    """Start the run, call `fault` once a block has checkpointed mid-training (its next checkpoint or its layers
    are the next writes), wait for the run to end; its exit code and output, and the MLflow parent run's status."""
    process = space.start()
    try:
        assert _wait_for(lambda: bool(_checkpoints(space.run)), 300, process), \
            (space.root / "err-0.txt").read_text()[-3000:]
        fault()
        done = space.finish(process, timeout=300)
    finally:
        _kill_group(process)
    return done, _parent_status(space.uri, space.run)


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory) -> dict[str, Any]:
    """A run whose tmpfs output folder fills up once a block has checkpointed, so its next checkpoint and the
    layers' students find no space; then its run folder copied to a roomy disk and run again there, on the same
    MLflow store."""
    root = tmp_path_factory.mktemp("disk-full")
    space = Workspace(root, root / "small")
    # the preflight's disk estimate fits; the test fills the rest once a block has checkpointed
    _mount_tmpfs(space.output_dir, 96)
    try:
        failed, parent = _run_until_fault(space, lambda: _fill(space.output_dir))
        roomy = Workspace(root, root / "roomy", uri=space.uri, attempts=space.attempts)
        shutil.copytree(space.run, roomy.run, symlinks=True)
    finally:
        _unmount_all(space.output_dir)
    return {"space": space, "failed": failed, "parent": parent, "roomy": roomy, "rerun": roomy.finish(roomy.start())}


def test_full_disk_is_one_line_and_exit_1(disk_full):
    failed = disk_full["failed"]
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert _error_lines(failed) == [f"error: no space left on device writing {disk_full['space'].run}; free space "
                                    "or choose another --output-dir"], failed.stderr[-3000:]


def test_full_disk_prints_no_traceback(disk_full):
    assert "Traceback" not in disk_full["failed"].stderr, disk_full["failed"].stderr[-3000:]


def test_full_disk_marks_the_mlflow_run_failed(disk_full):
    assert disk_full["parent"] == "FAILED"


def test_run_stopped_by_a_full_disk_resumes_on_a_roomy_one(disk_full, reference):
    roomy, rerun = disk_full["roomy"], disk_full["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _result(roomy.run) == reference
    _check_registry(roomy.uri, roomy.run)
    _check_tracking(roomy.uri, roomy.run)  # the FAILED parent run, reattached and FINISHED


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> dict[str, Any]:
    """A run whose folder turns read-only once a block has checkpointed: the folder is bind-mounted read-only
    over itself (a read-only remount of the whole tmpfs is refused while the run holds files open for writing,
    and chmod does not stop root)."""
    space = Workspace(tmp_path_factory.mktemp("read-only"))
    _mount_tmpfs(space.output_dir, 96)

    def remount_read_only() -> None:
        subprocess.run(["mount", "--bind", "-o", "ro", str(space.run), str(space.run)], check=True,
                       capture_output=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (space.run / "probe").write_text("x")

    try:
        failed, parent = _run_until_fault(space, remount_read_only)
    finally:
        _unmount_all(space.run, space.output_dir)
    return {"space": space, "failed": failed, "parent": parent}


def test_run_folder_turning_read_only_is_one_line_and_exit_1(read_only):
    failed, run = read_only["failed"], read_only["space"].run
    assert failed.returncode == 1, failed.stderr[-3000:]
    errors = _error_lines(failed)
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "Read-only file system" in errors[0] and str(run) in errors[0], errors[0]
    assert read_only["parent"] == "FAILED"


def test_read_only_error_names_the_write_that_failed(read_only):
    errors = _error_lines(read_only["failed"])
    assert errors and ".lock.json" not in errors[0], errors
