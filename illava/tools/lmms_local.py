"""A small MME-style lmms-eval task built from real photos, for offline end-to-end checks.

``write_yes_no_task(folder)`` writes real photos (scikit-image's sample data), a JSON-lines file of
yes/no questions in MME's format (two questions per image, one true, one false, "Please answer yes
or no."), the task YAML and its ``utils.py``. lmms-eval runs it with ``--include_path folder``
and no network: the dataset is read from the local JSON-lines file by ``datasets``' json builder.
Metrics as MME reports them per question (``accuracy``) and per image (``accuracy_plus``: both
questions right).
"""

from __future__ import annotations

import json
from pathlib import Path

# (skimage.data name, true statement, false statement)
_QUESTIONS = [
    ("astronaut", "Is there a person in this image?", "Is there a cat in this image?"),
    ("chelsea", "Is there a cat in this image?", "Is there a person in this image?"),
    ("coffee", "Is there a cup in this image?", "Is there a rocket in this image?"),
    ("rocket", "Is there a rocket in this image?", "Is there a cup in this image?"),
    ("camera", "Is this a black and white photo?", "Is this photo mostly red?"),
    ("hubble_deep_field", "Is this a picture of space?", "Is this a picture of a kitchen?"),
    ("coins", "Are there coins in this image?", "Is there a dog in this image?"),
    ("page", "Is there text in this image?", "Is there a horse in this image?"),
]

_UTILS = '''"""Task functions of the illava offline MME-style task (written by illava.lmms_local)."""

import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def _label(text):
    text = text.lower().strip().replace(".", "")
    if text.startswith("yes"):
        return "yes"
    if text.startswith("no"):
        return "no"
    return "other"


def process_results(doc, results):
    correct = float(_label(results[0]) == doc["answer"])
    return {"accuracy": correct, "accuracy_plus": {"image": doc["image"], "correct": correct}}


def aggregate_plus(results):
    per_image = {}
    for r in results:
        per_image.setdefault(r["image"], []).append(r["correct"])
    return sum(all(v) for v in per_image.values()) / max(len(per_image), 1)
'''


def write_yes_no_task(folder: str | Path, name: str = "illava_mme_local") -> Path:
    """Write the task into ``folder`` (created); returns the folder for ``--include_path``."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = Path(folder).resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for picture, true_q, false_q in _QUESTIONS:
        array = getattr(data, picture)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(array.astype(np.uint8)).convert("RGB")
        path = f"images/{picture}.png"
        image.save(folder / path)
        for question, answer in ((true_q, "yes"), (false_q, "no")):
            rows.append({"question_id": f"{picture}-{answer}", "image": path, "question": question, "answer": answer})
    data_file = folder / "test.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(_UTILS)
    (folder / f"{name}.yaml").write_text(
        f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
task: "{name}"
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: accuracy_plus
    aggregation: !function utils.aggregate_plus
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: " Please answer yes or no."
metadata:
  - version: 0.0
"""
    )
    return folder
