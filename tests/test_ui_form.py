"""The Prefect form of the `convert` deployment, as generated from the flow: every field described, choices where
there are choices, and help text that survives the UI (which drops anything between angle brackets)."""

from __future__ import annotations

import json
import re
from typing import get_args

import pytest


@pytest.fixture(scope="module")
def schema():
    from prefect.utilities.callables import parameter_schema

    from flows.convert import convert

    return parameter_schema(convert).model_dump()  # what `prefect deploy` sends as the deployment's form


def _fields(schema):
    yield from (("convert", name, spec) for name, spec in schema["properties"].items())
    for model, definition in schema["definitions"].items():
        yield from ((model, name, spec) for name, spec in definition["properties"].items())


def test_every_field_is_described(schema):
    missing = [f"{model}.{name}" for model, name, spec in _fields(schema) if not spec.get("description")]
    assert missing == []


def test_help_text_has_nothing_the_ui_would_strip(schema):
    stripped = [f"{model}.{name}: {spec['description']}" for model, name, spec in _fields(schema)
                if re.search(r"<[^>]*>", spec.get("description", ""))]
    assert stripped == []


def _choices(spec: dict) -> list[str]:
    return next(option["enum"] for option in spec["anyOf"] if "enum" in option)


def test_model_offers_the_built_in_names_and_still_takes_a_path(schema):
    from dtr_core.models import BUILTIN_MODELS
    from tasks.params import ConvertParams

    model = schema["properties"]["model"]
    assert _choices(model) == list(BUILTIN_MODELS)
    assert {"type": "string", "title": "folder or hub id"} in model["anyOf"]
    assert ConvertParams(model="/data/my-model").model == "/data/my-model"
    assert ConvertParams(model="tiny-llama").model == "tiny-llama"


def test_task_and_mixer_offer_their_registries(schema):
    from dtr_core.evaluation import TASKS
    from dtr_core.mixers import MIXERS
    from tasks.params import BuiltinModel, BuiltinTask

    assert _choices(schema["definitions"]["TaskParams"]["properties"]["name"]) == sorted(TASKS)
    assert list(get_args(BuiltinTask)) == sorted(TASKS)
    assert schema["properties"]["mixer"]["enum"] == sorted(MIXERS)
    assert schema["definitions"]["TrackingParams"]["properties"]["promote"]["enum"] == ["latest", "if-better"]
    assert get_args(BuiltinModel)


def test_descriptions_come_from_the_parameter_models(schema):
    """One source: the top-level help is ConvertParams's own description, word for word."""
    from tasks.params import ConvertParams

    for name, spec in schema["properties"].items():
        assert spec["description"] == " ".join(ConvertParams.model_fields[name].description.split()), name
    assert json.dumps(schema)  # JSON as the API stores it
