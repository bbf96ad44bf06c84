"""docs/DESIGN.md matches the code: every file it names exists, and every public name it lists under a
`dtr_core` section is defined in one of that section's modules."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
SECTION = re.compile(r"^### (.+?) — ", re.MULTILINE)
FILE = re.compile(r"`((?:dtr_core|tasks|flows|dtr|benchmarks)/[\w/]*\.py)`")
# `name(`, `Name`, `NAME` in backticks, optionally `Class.method(`; plain words in backticks are values, not names
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_]\w*))?(\(|`)")


def _sections() -> list[tuple[list[str], str]]:
    starts = list(SECTION.finditer(DESIGN))
    sections = []
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else DESIGN.find("\n## ", match.end())
        files = FILE.findall(match.group(1))
        folder = re.findall(r"`(dtr_core/\w+)/`", match.group(1))
        if folder:
            files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder[0]).glob("*.py"))
        sections.append((files, DESIGN[match.end():end]))
    return sections


def _module(path: str):
    return importlib.import_module(path[:-3].replace("/", ".").removesuffix(".__init__"))


# names of Python and transformers that the doc mentions as context, not as dtr's own
OTHERS = {"ValueError", "from_pretrained", "save_pretrained", "forward", "generate", "T", "B", "H", "D"}


def _is_name(name: str, called: bool) -> bool:
    return (called or name[0].isupper()) and name not in OTHERS


@pytest.mark.parametrize("path", sorted(set(FILE.findall(DESIGN))))
def test_every_file_named_exists(path):
    assert (ROOT / path).is_file(), f"docs/DESIGN.md names {path}, which does not exist"


@pytest.mark.parametrize("files, body", _sections(), ids=lambda value: value[0] if isinstance(value, list) else "")
def test_every_public_name_listed_is_defined(files, body):
    modules = [_module(path) for path in files if path.startswith("dtr_core/")]
    if not modules:
        pytest.fail(f"section names no dtr_core module: {files}")
    missing = []
    for name, attribute, end in NAME.findall(body):
        if not _is_name(name, end == "("):
            continue
        owners = [module for module in modules if hasattr(module, name)]
        if not owners and not any(hasattr(importlib.import_module("dtr_core." + sub), name)
                                  for sub in ("evaluation", "mixers")):
            missing.append(name)
        elif attribute and not any(hasattr(getattr(module, name), attribute) for module in owners):
            missing.append(f"{name}.{attribute}")
    assert not missing, f"docs/DESIGN.md lists names the code does not define in {files}: {missing}"
