"""The run's artifact layout, which the pipeline (tasks/, flows/) shares with the core.

Artifact layout of one conversion (docs/DESIGN.md), every file written atomically:
```
runs/<run_id>/config.json                     the validated parameters (JSON)
runs/<run_id>/students/layer_007/             dtr_core.distill.training (meta.json written last)
runs/<run_id>/students/block_007-013/         dtr_core.distill.checkpoint (while that block trains)
runs/<run_id>/greedy/candidates/r03_l007.json one scored candidate of round 3 (resume inside a round)
runs/<run_id>/greedy/round_03.json            a finished round (dtr_core.search.decisions.RoundRecord)
runs/<run_id>/greedy/trajectory.json          the search's answer (GreedyResult)
runs/<run_id>/hybrids/{best,opt}/             dtr_core.hybrid.export (dtr_export.json inside, written last)
runs/<run_id>/reports/                        evaluations, speed, plots
runs/<run_id>/summary.json                    written last of all: the run completed
```
The greedy round's scorer, which the pipeline runs one candidate per task, is `dtr_core/search/scorer.py`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dtr_core.artifacts import check_replaceable

__all__ = ["RunLayout", "slug"]


def slug(text: str, limit: int = 40) -> str:
    """A lowercase name safe in paths, MLflow model names and Prefect artifact keys."""
    text = Path(text).stem if ("/" in text or text.endswith(".json")) else text
    return (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x")[:limit]


class RunLayout:
    """Paths of one conversion's artifacts (see the module docstring)."""

    STARTED = {".lock", ".lock.json"}  # what `run_lock.run_folder_lock` writes before anything else

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check_owned(self) -> None:
        """Raise `NotADtrArtifact` when `root` exists, is not empty and is not a dtr run folder: a conversion
        never writes into a folder of the user's. A run folder carries the `.dtr-artifact` marker (kind "run"),
        or, from before the marker, a `config.json` holding the run's `run_id`; a folder that holds only what
        a starting run writes first (its lock) is one too."""
        from dtr_core.artifacts import MARKER, NotADtrArtifact, read_json

        if not self.root.exists() or (self.root.is_dir() and {p.name for p in self.root.iterdir()} <= self.STARTED):
            return
        if (self.root / MARKER).is_file():
            return
        try:
            if self.root.is_dir() and read_json(self.config).get("run_id") == self.root.name:
                return
        except (OSError, ValueError, AttributeError):
            pass
        raise NotADtrArtifact(f"{self.root} exists and is not a dtr run folder; choose another --run-id or "
                              "--output-dir (dtr never writes into a folder it did not create)")

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def greedy(self) -> Path:
        return self.root / "greedy"

    def candidate(self, round_index: int, layer: int) -> Path:
        return self.greedy / "candidates" / f"r{round_index:02d}_l{layer:03d}.json"

    def round(self, round_index: int) -> Path:
        return self.greedy / f"round_{round_index:02d}.json"

    @property
    def trajectory(self) -> Path:
        return self.greedy / "trajectory.json"

    @property
    def heal_state(self) -> Path:
        """The running heal's checkpoint (gone once the heal ends)."""
        return self.root / "heal"

    def hybrid(self, role: str) -> Path:
        return self.root / "hybrids" / role

    def alias_hybrid(self, role: str, target: str | Path) -> Path:
        """`hybrid(role)` becomes a relative symlink to the folder `target` (replacing what a resumed run left)."""
        link = self.hybrid(role)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            check_replaceable(link)  # an exported hybrid of an earlier run, never a folder of the user's
            shutil.rmtree(link)
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
        return link

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"
