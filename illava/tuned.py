"""The file ``illava tune`` writes: a chosen setting, the model it was chosen for, and its evidence.

Both engines read it: ``illava.apply(model, "tuned.json")`` (``illava.configure``) and the vLLM plugin
(``ILLAVA_VLLM=tuned.json``, or ``--hf-overrides '{"illava": "tuned.json"}'``). The setting is a *spec*
as the vLLM plugin takes one: ``{"method": NAME, "knob": VALUE, FIELD: VALUE, ...}`` or
``{"preset": NAME}``, so a file means the same configuration in both engines.

The model is identified by its family (``model_type``) and the dimensions the configuration depends
on (encoder depth, tokens per crop, decoder depth, feature layer, unit of removal); a file written for
another family or size is refused with both descriptions, never applied to the wrong model.

Layout (``FORMAT`` 1)::

    {"illava_tuned": 1,
     "spec": {"method": "tome", "knob": 0.43},
     "config": "<the IllavaConfig, as text>",
     "model": {"name": ..., "model_type": ..., "encoder_depth": ..., "tokens_per_crop": ...,
               "llm_depth": ..., "feature_layer": ..., "unit": ...},
     "engine": "transformers" | "vllm",
     "rule": {"budget": 0.5} | {"agreement": 0.99},
     "evidence": {"inputs": 50, "agreement": ..., "kl": ..., "flops_share": ..., "prefill_speedup": ...},
     "candidates": [...]}
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = 1
KEY = "illava_tuned"
IDENTITY = ("model_type", "encoder_depth", "tokens_per_crop", "llm_depth", "feature_layer", "unit")


def is_tuned_path(value) -> bool:
    """Whether ``value`` names a tuned file (a path ending in ``.json``)."""
    return isinstance(value, (str, Path)) and str(value).strip().lower().endswith(".json")


def read(path: str | Path) -> dict:
    """The file's contents, checked for its format; ``ValueError`` / ``FileNotFoundError`` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tuned file at {path} (write one with: illava tune MODEL --inputs ... --out {path})"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict) or data.get(KEY) != FORMAT or not isinstance(data.get("spec"), dict):
        raise ValueError(f"{path} is not a file of illava tune (format {FORMAT}: a mapping with {KEY!r}: {FORMAT})")
    return data


def check_model(data: dict, identity: dict, path: str | Path = "the tuned file") -> None:
    """``ValueError`` when the file was written for another family or size than ``identity``."""
    written = data.get("model", {})
    differ = [k for k in IDENTITY if k in written and k in identity and written[k] != identity[k]]
    if differ:

        def describe(d: dict) -> str:
            return ", ".join(f"{k} {d.get(k)}" for k in IDENTITY)

        raise ValueError(
            f"{path} was tuned for another model ({written.get('name', '?')}: {describe(written)}); this model has "
            f"{describe(identity)}. Tune it for this model: illava tune MODEL --inputs ..."
        )


def spec_of(data: dict) -> tuple[str | None, float | None, dict]:
    """(preset or method name, knob, field overrides) of a file's spec (lists as tuples)."""
    fields = dict(data["spec"])
    name = fields.pop("preset", None) or fields.pop("method", None)
    knob = fields.pop("knob", None)
    return name, knob, {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def write(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps({KEY: FORMAT, **data}, indent=2) + "\n")
    return path
