"""The MLflow pyfunc wrapper of an exported dtr hybrid (no Prefect here: MLflow loads this module alone).

Logged with `artifacts={"hybrid": <save_pretrained folder>, "task": <task.json>}` and
`code_paths=[dtr_core, tasks/]`, as a model from code: `python_model` is this file's path and MLflow runs it
to get the model (`set_model` at the bottom), so the artifact holds no pickled object; loading needs only the
pinned torch/transformers (the weights are the folder's safetensors). `predict` takes a DataFrame with a `text`
column and
- classification tasks: returns `label` (the verbaliser the model finds most likely after the task's
  prompt, exactly as `dtr_core.evaluation` scores) and `confidence` (its softmax share among the labels);
- language-modelling tasks: returns `generated`, a greedy continuation of `params["max_new_tokens"]` tokens.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd

SENTINEL = "\u0000DTR_TEXT\u0000"


def task_card(task) -> dict[str, Any]:
    """What predict needs to know about a `dtr_core.evaluation.Task`, as JSON (prompt around the text)."""
    from dtr_core.evaluation import Example

    if task.kind == "classification":
        prompt = task.prompt(Example(uid="card", text=SENTINEL, label=task.labels[0]))
        before, after = prompt.split(SENTINEL)
        return {"name": task.name, "kind": task.kind, "before": before, "after": after,
                "verbalisers": [list(pair) for pair in task.verbalisers], "add_bos": task.add_bos,
                "verbaliser_scoring": task.verbaliser_scoring}
    return {"name": task.name, "kind": task.kind}


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


class DtrHybridModel(mlflow.pyfunc.PythonModel):
    """pyfunc: classify with the task's verbalisers, or generate (see the module docstring)."""

    def load_context(self, context) -> None:
        import dtr_core.hybrid  # noqa: F401  registers the dtr hybrid classes with transformers
        from dtr_core.models import load_model

        self.model, self.tokenizer = load_model(context.artifacts["hybrid"])
        with open(context.artifacts["task"], encoding="utf-8") as f:
            self.card = json.load(f)
        self.task = None
        if self.card["kind"] == "classification":
            from dtr_core.evaluation import ClassificationTask

            self.task = ClassificationTask(
                name=self.card["name"], load=lambda: (), verbalisers=tuple(map(tuple, self.card["verbalisers"])),
                template=_escape(self.card["before"]) + "{text}" + _escape(self.card["after"]),
                add_bos=self.card["add_bos"], verbaliser_scoring=self.card.get("verbaliser_scoring"))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        texts = [str(t) for t in model_input["text"]]
        if self.task is not None:
            from dtr_core.evaluation import Example, encode, model_logits, score_logits

            labels = self.task.labels
            examples = [Example(uid=str(i), text=t, label=labels[0]) for i, t in enumerate(texts)]
            predicted: list[str] = [""] * len(texts)
            confidence = [0.0] * len(texts)
            with torch.inference_mode():
                for batch in encode(self.task, examples, self.tokenizer):
                    scores = score_logits(batch, model_logits(self.model, batch))
                    shares = torch.softmax(scores.label_logprobs / batch.label_divisors, dim=1)  # as compared
                    for row, index in enumerate(scores.example_index.tolist()):
                        choice = int(scores.predictions[row])
                        predicted[index] = labels[choice]
                        confidence[index] = float(shares[row, choice])
            return pd.DataFrame({"label": predicted, "confidence": confidence})
        max_new_tokens = int((params or {}).get("max_new_tokens", 32))
        generated = []
        with torch.inference_mode():
            for text in texts:
                ids = self.tokenizer(text, return_tensors="pt").input_ids
                out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
                generated.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return pd.DataFrame({"generated": generated})


def signature_for(kind: str):
    """Input: a `text` column. Output: label + confidence, or the generated text (with max_new_tokens)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "text")])
    if kind == "classification":
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "label"),
                                                             ColSpec("double", "confidence")]))
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "generated")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))


# Models from code: MLflow executes this file when loading and takes the model set here (nothing unpickled).
mlflow.models.set_model(DtrHybridModel())
