"""Which of illava's files one forward runs code from, and how often the call stack climbs back up.

    python benchmarks/files_visited.py [--json F]               # transformers: two forwards
    .venv/bin/python tests_vllm/reference.py build qwen2_vl /tmp/qwen2_vl     # the tests' tiny Qwen2-VL
    .venv-vllm/bin/python benchmarks/files_visited.py --vllm /tmp/qwen2_vl   # vLLM: one forward

A maintainer reading what one forward does has to open every file it visits. The forwards:

- **encoder stage** (LLaVA-OneVision, tiny random weights, preset ``encoder-only``, one image);
- **LLM stage** (Qwen2-VL, tiny, preset ``llm-only``, one image);
- **vLLM** (Qwen2-VL, tiny, ``encoder-only`` through the plugin, one image; run in the vLLM venv).

Every Python call inside ``illava/`` is recorded (``sys.setprofile``, in-process; vLLM with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). A *climb back* is a call from a lower layer of the package into
a higher one. The layers, low to high: the engine-neutral core (``config``, ``merge``, ``policy``,
``families``, ``presets``, ``methods``, ``resolve``, ``tuned``); the ``plan``; ``state`` and
``patch``; the engines' shared runtime (``hf``, ``vllm/encoder``); the families' files
(``adapters``, ``vllm/<family>``); the entry points (``api``, ``tools``). Calls made by the dispatch
of ``illava.patch`` (a hook's ``Guard``, which torch calls) are not climbs. Prints the files and the
climbs (caller -> callee), and the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "illava"

LAYERS = [
    ("core", ("config.py", "merge.py", "policy.py", "families.py", "presets.py", "methods.py", "resolve.py",
              "tuned.py", "_compat.py", "testing.py")),
    ("plan", ("plan/",)),
    ("state", ("state.py", "patch.py")),
    ("runtime", ("hf/", "vllm/encoder.py", "vllm/config.py", "vllm/families.py", "vllm/serving.py")),
    ("family", ("adapters/", "vllm/llava.py", "vllm/qwen_vl.py", "vllm/__init__.py")),
    ("entry", ("api.py", "__init__.py", "tools/")),
]  # fmt: skip


# the dispatch of ``illava.patch``: torch calls a hook's ``Guard``, a swapped method's compile guard calls
# ours; what they call is called by torch as far as layering goes, not a climb back
DISPATCH = {("patch.py", "__call__"), ("patch.py", "method")}


def layer_of(rel: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            return i
    return len(LAYERS)


def _rel(filename: str) -> str | None:
    try:
        return str(Path(filename).resolve().relative_to(PACKAGE))
    except ValueError:
        return None


class Recorder:
    """``sys.setprofile`` callback: the illava files whose code runs, and the climbs back."""

    def __init__(self):
        self.files: dict[str, int] = {}
        self.climbs: dict[tuple[str, str], int] = {}
        self._cache: dict[str, str | None] = {}

    def rel(self, filename: str) -> str | None:
        if filename not in self._cache:
            self._cache[filename] = _rel(filename)
        return self._cache[filename]

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        callee = self.rel(frame.f_code.co_filename)
        if callee is None:
            return
        self.files[callee] = self.files.get(callee, 0) + 1
        back = frame.f_back
        caller = self.rel(back.f_code.co_filename) if back is not None else None
        dispatch = caller is not None and (caller, back.f_code.co_name) in DISPATCH
        if caller is not None and not dispatch and layer_of(caller) < layer_of(callee):
            key = (f"{caller}:{back.f_code.co_name}", f"{callee}:{frame.f_code.co_name}")
            self.climbs[key] = self.climbs.get(key, 0) + 1

    def report(self, name: str) -> dict:
        files = sorted(self.files)
        print(f"\n## {name}: {len(files)} files of illava/, {len(self.climbs)} distinct climbs back")
        for f in files:
            print(f"  [{LAYERS[layer_of(f)][0] if layer_of(f) < len(LAYERS) else '?'}] {f}  ({self.files[f]} calls)")
        for (a, b), n in sorted(self.climbs.items()):
            print(f"  climb: {a} -> {b}  (x{n})")
        return {"files": files, "climbs": [[a, b, n] for (a, b), n in sorted(self.climbs.items())]}


def traced(fn) -> Recorder:
    recorder = Recorder()
    sys.setprofile(recorder)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return recorder


def _tiny(arch: str):
    import torch
    from transformers import AutoModelForImageTextToText

    from illava.tools.architectures import tiny_config

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_config(arch)).eval()


def _inputs(model, prompt: str):
    import numpy as np
    from PIL import Image

    from illava.tools.families import tools_for
    from illava.tools.inputs import word_tokenizer

    image = Image.fromarray((np.random.RandomState(0).rand(112, 112, 3) * 255).astype("uint8"))
    tools = tools_for(model)
    return tools.build_inputs(model.config, word_tokenizer(), [prompt], images=[image])


def transformers_forwards() -> dict:
    import torch

    import illava

    out = {}
    for name, arch, preset in (
        ("encoder-stage forward (LLaVA-OneVision, encoder-only)", "tiny-llava-onevision", "encoder-only"),
        ("LLM-stage forward (Qwen2-VL, llm-only)", "tiny-qwen2-vl", "llm-only"),
    ):
        model = _tiny(arch)
        inputs = _inputs(model, "<image> what is in the picture ?")
        illava.apply(model, preset)
        with torch.inference_mode():
            model(**inputs)  # warm: first-call imports are not the forward's
            recorder = traced(lambda model=model, inputs=inputs: model(**inputs))
        out[name] = recorder.report(name)
    return out


def vllm_forward(folder: Path) -> dict:
    """One generate of the tiny Qwen2-VL in vLLM with the plugin (``encoder-only``), traced in-process;
    ``folder``: the tests' tiny Qwen2-VL, saved with its processor by the main venv
    (``.venv/bin/python tests_vllm/reference.py build qwen2_vl FOLDER``)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["ILLAVA_VLLM"] = "encoder-only"
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=2048,
              gpu_memory_utilization=0.15, seed=0, limit_mm_per_prompt={"image": 1})  # fmt: skip

    def prompt(seed: int) -> dict:  # another image each time: vLLM caches an image's encoder output
        image = Image.fromarray((np.random.RandomState(seed).rand(112, 112, 3) * 255).astype("uint8"))
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is this?<|im_end|>\n"
        return {"prompt": text + "<|im_start|>assistant\n", "multi_modal_data": {"image": image}}

    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([prompt(0)], params)  # warm
    name = "vLLM forward (Qwen2-VL, encoder-only)"
    return {name: traced(lambda: llm.generate([prompt(1)], params)).report(name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vllm", type=Path, default=None, metavar="FOLDER", help="the vLLM forward on this tiny Qwen2-VL folder"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = vllm_forward(args.vllm) if args.vllm else transformers_forwards()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
