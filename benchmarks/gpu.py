"""GPU figures in one prepared run: what iLLaVA buys on one GPU, the most important rows first.

Rows, in this order (the JSON is rewritten after every row, so a run cut short keeps what it measured):
1. ``image``: LLaVA-OneVision-7B architecture, one 1280x720 image (AnyRes), ``image`` preset:
   stock vs patched-but-disabled vs iLLaVA (``illava.tools.bench.run_bench``: encoder time,
   prefill / time to first token, decode tokens/s, end-to-end samples/s, peak memory, visual tokens
   and FLOPs per stage);
2. ``video``: the same with the ``video`` preset on a 32-frame video;
3. ``throughput``: the largest batch that fits under one memory cap, for stock and for iLLaVA, and
   the samples/s of ``generate`` at that batch for each (the paper's throughput at equal memory);
4. ``qwen2.5-vl image``: Qwen2.5-VL-7B architecture, one 1280x720 image;
5. ``internvl image``: InternVL2.5-26B architecture (InternViT-6B), one 1280x720 image; skipped
   when the GPU has too little free memory for it;
6. ``merge layer cost``: one encoder merge layer (explicit-softmax attention that also scores,
   merge, MLP on the survivors) vs the same layer run stock (fused SDPA), at the token count of the
   image of row 1, for the SigLIP layer of LLaVA-OneVision and the InternViT layer of InternVL; and
   the attention alone (``attention_with_received_scores`` vs SDPA on the same q, k, v).

Random weights at the published dimensions (compute does not depend on the weight values), built
directly on the device in bf16, SDPA. Every comparison alternates its settings (A B C A B C ...);
besides run_bench's ratio of medians, every gain is also given as the median of the ratios of
adjacent runs and as the ratio of the best runs. A row is skipped, with its reason recorded, when
its estimated time would exceed ``--budget-s``.

    bash benchmarks/gpu.sh --out DIR                 # on the GPU machine: installs, then runs this
    python benchmarks/gpu.py --dry-run --out DIR     # CPU, tiny configurations, the same code, seconds
    python benchmarks/readme_table.py --from-json DIR/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image

import illava
from illava.adapters import adapter_for
from illava.merge import attention_with_received_scores
from illava.tools import bench
from illava.tools.architectures import architectures, build_architecture, tiny_config
from illava.tools.inputs import repeat_batch

# role -> (architecture on the GPU, tiny configuration of the dry run)
ARCHITECTURES = {
    "llava": ("llava-onevision-qwen2-7b", "tiny-llava-onevision"),
    "qwen": ("qwen2.5-vl-7b", "tiny-qwen2.5-vl"),
    "internvl": ("internvl2.5-26b", "tiny-internvl"),
}
# rough seconds per row on one H100 (model build included): a row starts only if it fits the budget
ESTIMATE_S = {1: 60, 2: 90, 3: 150, 4: 50, 5: 80, 6: 30}
DEFAULT_CAP_GB = 32.0  # throughput: memory cap (GPU), unless --memory-cap-gb; keeps the batch search short
MARGIN_GB = 4.0  # kept free on the GPU: under the cap, and on top of a model's weights


class Skip(Exception):
    """A row that cannot run here (recorded as skipped, with the message as the reason)."""


@dataclass(frozen=True)
class Plan:
    """How the rows run: the real thing on a GPU, or the dry run (CPU, tiny configurations, seconds)."""

    dry_run: bool
    device: torch.device
    dtype: torch.dtype
    repeats: int
    warmup: int
    new_tokens: int
    image_size: tuple[int, int]  # (width, height)
    frames: int
    max_batch: int  # throughput search: largest batch tried
    throughput_repeats: int
    layer_calls: int  # merge layer: calls per timed run (one call takes milliseconds on a GPU)
    memory_cap_gb: float | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.dry_run:
            return cls(dry_run=True, device=torch.device("cpu"), dtype=torch.float32, repeats=1, warmup=0,
                       new_tokens=2, image_size=(256, 144), frames=4, max_batch=8, throughput_repeats=1,
                       layer_calls=1, memory_cap_gb=args.memory_cap_gb)  # fmt: skip
        if not torch.cuda.is_available():
            sys.exit("gpu.py: no CUDA device (use --dry-run for the CPU check)")
        return cls(dry_run=False, device=torch.device("cuda"), dtype=torch.bfloat16, repeats=args.repeats, warmup=1,
                   new_tokens=16, image_size=(1280, 720), frames=32, max_batch=256, throughput_repeats=3,
                   layer_calls=10, memory_cap_gb=args.memory_cap_gb)  # fmt: skip

    def arch(self, role: str) -> str:
        return ARCHITECTURES[role][1 if self.dry_run else 0]

    def image(self) -> Image.Image:
        """The bundled photo at ``image_size`` (its content does not change the compute)."""
        return bench.default_image().resize(self.image_size)


# ------------------------------------------------------------------------------------ models
def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(name: str, dtype: torch.dtype, device: torch.device | str, **truncate) -> torch.nn.Module:
    """A bundled architecture (random weights; ``truncate``: ``llm_layers`` / ``vision_layers`` kept)
    or a tiny configuration (built whole), on ``device``, SDPA."""
    torch.manual_seed(0)
    if name in architectures():
        model = build_architecture(name, dtype=dtype, device=device, **truncate)
    else:
        from transformers import AutoModelForImageTextToText

        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(tiny_config(name), dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def weights_gb(name: str, dtype: torch.dtype, **truncate) -> float:
    """Memory of the weights of ``name`` (counted on the meta device: no memory used)."""
    model = build(name, dtype, "meta", **truncate)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize / 2**30


class Models:
    """One model on the device at a time: asking for another one frees the previous one first."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.key: tuple | None = None
        self.model: torch.nn.Module | None = None

    def get(self, name: str, **truncate) -> torch.nn.Module:
        key = (name, tuple(sorted(truncate.items())))
        if key != self.key:
            self.free()
            self._check_memory(name, truncate)
            layers = f" ({', '.join(f'{k}={v}' for k, v in truncate.items())})" if truncate else ""
            print(f"  building {name}{layers} on {self.plan.device}, {self.plan.dtype}", flush=True)
            self.model, self.key = build(name, self.plan.dtype, self.plan.device, **truncate), key
        return self.model

    def free(self) -> None:
        self.model = self.key = None
        release_memory()

    def _check_memory(self, name: str, truncate: dict) -> None:
        if self.plan.device.type != "cuda":
            return
        need = weights_gb(name, self.plan.dtype, **truncate) + MARGIN_GB
        free = torch.cuda.mem_get_info(self.plan.device)[0] / 2**30
        if free < need:
            raise Skip(f"{name} needs about {need:.0f} GiB, {free:.0f} GiB free on {device_name(self.plan)}")


def use(model: torch.nn.Module, config) -> None:
    """Stock model (``config`` None) or iLLaVA with ``config``."""
    if config is None:
        illava.remove(model)
    else:
        illava.apply(model, config)


# ------------------------------------------------------------------------------------ figures
def gain(metric: str, base: float, other: float) -> float:
    """> 1: ``other`` is better than ``base`` (times and memory: base / other; rates: other / base)."""
    return other / base if metric in bench.HIGHER_IS_BETTER else base / other


def gain_estimates(metric: str, base: list[float], other: list[float], median_ratio: float | None = None) -> dict:
    """Three estimates of the gain of ``other`` over ``base`` from alternated runs (> 1: better):
    ratio of medians; median of the ratios of adjacent runs (run i of both ran next to each other,
    so slow drifts of the machine cancel); ratio of the best runs (minimum times, maximum rates)."""
    pairs = [gain(metric, b, o) for b, o in zip(base, other) if b and o]
    best = max if metric in bench.HIGHER_IS_BETTER else min
    if median_ratio is None and base and other and statistics.median(other):
        median_ratio = gain(metric, statistics.median(base), statistics.median(other))
    return {
        "median_ratio": median_ratio,
        "pair_median": statistics.median(pairs) if pairs else None,
        "min_ratio": gain(metric, best(base), best(other)) if pairs else None,
    }


def report_gains(report: dict) -> dict:
    """``gain_estimates`` of every setting of a ``run_bench`` report over stock, per metric."""
    settings = report["settings"]
    stock = settings["stock"]["metrics"]
    return {
        name: {
            metric: gain_estimates(metric, stock[metric]["values"], settings[name]["metrics"][metric]["values"], value)
            for metric, value in ratios.items()
        }
        for name, ratios in report["ratios"].items()
    }


def alternate(
    calls: dict[str, tuple[Callable[[], None], Callable[[], None]]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of every ``call``, alternated (A B A B ...) after ``warmup`` rounds; each call's
    ``setup`` runs untimed just before it."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, (setup, call) in calls.items():
                setup()
                bench._sync(device)
                start = time.perf_counter()
                call()
                bench._sync(device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


# ------------------------------------------------------------------------------------ rows 1, 2, 4, 5
def bench_row(plan: Plan, models: Models, role: str, preset: str, video: bool = False) -> dict:
    """Stock vs patched-but-disabled vs iLLaVA on one image (or one video) with ``preset``:
    ``illava.tools.bench.run_bench`` (encoder, prefill, decode, end-to-end, peak memory, visual
    tokens and FLOPs per stage), plus the gains as pair medians and ratios of the best runs."""
    name = plan.arch(role)
    model = models.get(name)
    images, videos = ([], [bench.default_video(plan.frames)]) if video else ([plan.image()], [])
    media = f"{plan.frames}-frame video" if video else "{}x{} image".format(*plan.image_size)
    inputs = bench.make_inputs(model, None, images, videos, 1)
    report = bench.run_bench(
        model,
        name,
        inputs,
        preset,
        new_tokens=plan.new_tokens,
        repeats=plan.repeats,
        warmup=plan.warmup,
        progress=lambda _: print(".", end="", flush=True),
    )
    print(flush=True)
    tokens = {s: report["settings"][s]["visual_tokens"] for s in ("stock", "illava")}
    return {"architecture": name, "preset": preset, "media": media, "visual_tokens": tokens,
            "gains": report_gains(report), "report": report}  # fmt: skip


# ------------------------------------------------------------------------------------ row 3
def generate_peak_mb(model: torch.nn.Module, sample: dict, batch: int, plan: Plan) -> float | None:
    """Peak memory of ``generate`` at ``batch`` copies of ``sample`` (``bench.peak_memory_mb``);
    None when it ran out of device memory."""
    inputs = repeat_batch(sample, batch)
    try:
        with torch.inference_mode():
            return bench.peak_memory_mb(model, inputs, plan.new_tokens, plan.device)
    except torch.cuda.OutOfMemoryError:
        return None
    except RuntimeError as error:  # some kernels report running out of memory as a plain RuntimeError
        if "out of memory" in str(error).lower() or "ALLOC_FAILED" in str(error):
            return None
        raise
    finally:
        del inputs
        release_memory()


def largest_batch(fits: Callable[[int], bool], max_batch: int, deadline: float) -> int:
    """Largest batch <= ``max_batch`` that ``fits``: doubling from 1, then bisecting until the
    bracket is within an eighth (or the deadline passed: the largest batch known to fit). 0: none."""
    good, bad, batch = 0, None, 1
    while batch <= max_batch and time.perf_counter() < deadline:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > max(1, good // 8) and time.perf_counter() < deadline:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def memory_cap_mb(plan: Plan, model: torch.nn.Module, sample: dict) -> float:
    """The cap both settings share: ``--memory-cap-gb``, else on a GPU the free memory less a margin
    (at most ``DEFAULT_CAP_GB``); on CPU (dry run) 2.5x the stock peak at batch 1 (live tensors)."""
    if plan.memory_cap_gb:
        return plan.memory_cap_gb * 1024
    if plan.device.type == "cuda":
        free = torch.cuda.mem_get_info(plan.device)[0] / 2**30
        return 1024 * min(free - MARGIN_GB, DEFAULT_CAP_GB)
    use(model, None)
    return 2.5 * generate_peak_mb(model, sample, 1, plan)


def batch_search(plan: Plan, model, sample: dict, setting: str, config, cap: float, seconds: float) -> dict:
    """``largest_batch`` of one setting under ``cap`` MB within ``seconds``, with every probe (batch,
    peak memory, fits); ``cut_short``: the search stopped at its deadline, not at its precision."""
    use(model, config)
    deadline = time.perf_counter() + seconds
    probes: list[dict] = []

    def fits(batch: int) -> bool:
        peak = generate_peak_mb(model, sample, batch, plan)
        probes.append({"batch": batch, "peak_memory_mb": peak, "fits": peak is not None and peak <= cap})
        print(f"  {setting} batch {batch}: peak {'out of memory' if peak is None else f'{peak:.0f} MB'}", flush=True)
        return probes[-1]["fits"]

    batch = largest_batch(fits, plan.max_batch, deadline)
    return {"batch": batch, "probes": probes, "cut_short": time.perf_counter() >= deadline}


def throughput_row(plan: Plan, models: Models, allotment_s: float) -> dict:
    """Throughput at equal memory: for stock and for iLLaVA (``image`` preset, one 1280x720 image
    per sample), the largest batch whose ``generate`` peak memory stays under one cap (CUDA: out of
    memory counts as not fitting), then samples/s of ``generate`` at that batch, alternated."""
    name = plan.arch("llava")
    model = models.get(name)
    sample = bench.make_inputs(model, None, [plan.image()], [], 1)
    cap = memory_cap_mb(plan, model, sample)
    settings = {"stock": None, "illava": illava.configure(model, "image")}
    search_s = 0.3 * allotment_s  # per setting; the rest: timing at the batches found
    found = {s: batch_search(plan, model, sample, s, config, cap, search_s) for s, config in settings.items()}
    inputs: dict[str, dict] = {}

    def setup(setting: str) -> Callable[[], None]:
        def run() -> None:
            inputs.clear()
            release_memory()
            use(model, settings[setting])
            inputs[setting] = repeat_batch(sample, found[setting]["batch"])

        return run

    def generate(setting: str) -> Callable[[], None]:
        kwargs = {"max_new_tokens": plan.new_tokens, "min_new_tokens": plan.new_tokens, "do_sample": False}
        return lambda: model.generate(**inputs[setting], **kwargs)

    timed = [s for s in settings if found[s]["batch"]]
    calls = {s: (setup(s), generate(s)) for s in timed}
    times = alternate(calls, plan.throughput_repeats, 0, plan.device)  # each batch already ran in the search
    inputs.clear()
    illava.remove(model)
    for setting in timed:
        found[setting]["samples_per_s"] = spread([found[setting]["batch"] / t for t in times[setting]])
    out = {"architecture": name, "preset": "image", "media": "{}x{} image".format(*plan.image_size),
           "memory_cap_mb": cap, "max_batch": plan.max_batch, "settings": found}  # fmt: skip
    if len(timed) == 2:
        rates = [found[s]["samples_per_s"]["values"] for s in ("stock", "illava")]
        out["gain"] = gain_estimates("samples_per_s", *rates)
    return out


# ------------------------------------------------------------------------------------ row 6
class _Captured(Exception):
    pass


def merge_layer_input(model: torch.nn.Module, layer: torch.nn.Module, inputs: dict) -> tuple[tuple, dict]:
    """The arguments the model passes to ``layer`` for ``inputs`` (a stock forward, stopped there)."""
    seen: dict[str, tuple] = {}

    def hook(module, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["call"]


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    vision = adapter_for(model).parts(model).vision
    return max((m for m in vision.modules() if isinstance(m, torch.nn.ModuleList)), key=len)


def merge_layer_cost(plan: Plan, models: Models, role: str) -> dict:
    """The first encoder merge layer of the ``image`` preset, at the token count of one image of
    ``image_size``: iLLaVA's layer vs the stock layer (SDPA) on the same hidden states, and the
    attention alone (explicit softmax returning the received attention vs SDPA). Ratios > 1: iLLaVA's
    path costs more. On the GPU the model is built only up to its last merge layer (1 decoder layer)."""
    name = plan.arch(role)
    full = build(name, plan.dtype, "meta") if name in architectures() else models.get(name)
    config = illava.configure(full, "image")
    index = min(config.encoder_layers)
    truncate = {"vision_layers": max(config.encoder_layers) + 1, "llm_layers": 1} if name in architectures() else {}
    del full
    model = models.get(name, **truncate)
    config = config.replace(llm_layers=(), llm_keep_ratio=1.0)
    layer = encoder_layers(model)[index]
    illava.remove(model)
    args, kwargs = merge_layer_input(model, layer, bench.make_inputs(model, None, [plan.image()], [], 1))
    hidden = args[0] if args else kwargs["hidden_states"]
    vc = model.config.vision_config
    heads = vc.num_attention_heads
    head_dim = vc.hidden_size // heads
    q, k, v = (torch.randn(hidden.shape[0], heads, hidden.shape[1], head_dim, dtype=plan.dtype, device=plan.device)
               for _ in range(3))  # fmt: skip

    def layer_calls() -> None:
        for _ in range(plan.layer_calls):
            layer(*args, **kwargs)

    def attention(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            for _ in range(plan.layer_calls):
                fn(q, k, v, scale=head_dim**-0.5)

        return run

    nothing = lambda: None  # noqa: E731
    calls = {
        "stock_layer": (lambda: use(model, None), layer_calls),
        "illava_layer": (lambda: use(model, config), layer_calls),
        "sdpa": (nothing, attention(torch.nn.functional.scaled_dot_product_attention)),
        "scoring_attention": (nothing, attention(attention_with_received_scores)),
    }
    times = alternate(calls, plan.repeats, plan.warmup, plan.device)
    illava.remove(model)
    per_call = {name: spread([t / plan.layer_calls for t in values]) for name, values in times.items()}
    # cost ratios, iLLaVA / stock (> 1: iLLaVA's path is slower): the time "gain" of stock over iLLaVA
    layer_cost = gain_estimates("time", times["illava_layer"], times["stock_layer"])
    attention_cost = gain_estimates("time", times["scoring_attention"], times["sdpa"])
    return {
        "architecture": name,
        "layer": index,
        "removal": config.removal_at(index),
        "crops": hidden.shape[0],
        "tokens_per_crop": hidden.shape[1],
        "hidden_size": hidden.shape[2],
        "heads": heads,
        "seconds_per_call": per_call,
        "layer_cost_ratio": layer_cost,
        "attention_cost_ratio": attention_cost,
    }


def merge_layer_row(plan: Plan, models: Models) -> dict:
    """``merge_layer_cost`` for the SigLIP layer of LLaVA-OneVision and the InternViT layer of InternVL;
    ``ratio``: the SigLIP layer's cost ratio (pair median)."""
    layers = []
    for role in ("llava", "internvl"):
        try:
            layers.append(merge_layer_cost(plan, models, role))
        except Exception as error:  # noqa: BLE001 - one family failing keeps the other
            layers.append({"architecture": plan.arch(role), "error": f"{type(error).__name__}: {error}"})
        models.free()
    first = layers[0].get("layer_cost_ratio", {})
    return {"layers": layers, "ratio": first.get("pair_median")}


# ------------------------------------------------------------------------------------ runner
def device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"


def environment(plan: Plan) -> dict:
    memory = torch.cuda.get_device_properties(plan.device).total_memory / 2**30 if plan.device.type == "cuda" else None
    return {
        "device": device_name(plan),
        "device_memory_gb": memory,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "illava_version": illava.__version__,
        "dry_run": plan.dry_run,
    }


class Runner:
    """Runs the rows in order within the time budget; rewrites ``out`` after every row."""

    def __init__(self, plan: Plan, out: Path, budget_s: float, rows: set[int] | None):
        self.plan, self.out, self.budget_s, self.selected = plan, out, budget_s, rows
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def row(self, number: int, name: str, measure: Callable[[], dict]) -> dict:
        """Run (or skip) one row, record it, write the JSON."""
        started, estimate = self.elapsed(), ESTIMATE_S[number]
        entry: dict = {"row": number, "name": name, "status": "ok", "reason": None}
        print(f"row {number} ({name}) at {started:.0f} s", flush=True)
        if self.selected is not None and number not in self.selected:
            entry.update(status="skipped", reason="not selected (--rows)")
        elif started + estimate > self.budget_s:
            entry.update(status="skipped", reason=f"budget: {started:.0f} s used, this row needs about "
                         f"{estimate} s, budget {self.budget_s:.0f} s")  # fmt: skip
        else:
            try:
                entry.update(measure())
            except Skip as skip:
                entry.update(status="skipped", reason=str(skip))
            except Exception as error:  # noqa: BLE001 - record it and go on with the next row
                entry.update(status="error", reason=f"{type(error).__name__}: {error}")
                entry["traceback"] = traceback.format_exc(limit=-8)
            release_memory()
        entry["timing"] = {"row_s": self.elapsed() - started, "started_at_s": started, "estimate_s": estimate}
        entry.update(environment(self.plan))
        self.rows.append(entry)
        self.write()
        print(f"row {number} ({name}): {summary(entry)}", flush=True)
        return entry

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.rows, indent=2, default=str))
        os.replace(partial, self.out)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def summary(entry: dict) -> str:
    """One line per row for the log."""
    took = f"{entry['timing']['row_s']:.0f} s"
    if entry["status"] != "ok":
        return f"{entry['status']} ({entry['reason']}) after {took}"
    if "report" in entry:
        g, t = entry["gains"]["illava"], entry["visual_tokens"]["illava"]
        return (
            f"ok in {took}: visual tokens {t['stock']} -> {t['after_encoder']} -> {t['after_llm']}, prefill gain "
            f"{_x(g['prefill_s']['pair_median'])} (pair median; min {_x(g['prefill_s']['min_ratio'])}), "
            f"end-to-end {_x(g['samples_per_s']['pair_median'])}"
        )
    if "memory_cap_mb" in entry:
        found = entry["settings"]
        return (
            f"ok in {took}: batch {found['stock']['batch']} (stock) vs {found['illava']['batch']} (iLLaVA) under "
            f"{entry['memory_cap_mb']:.0f} MB, samples/s gain {_x(entry.get('gain', {}).get('pair_median'))}"
        )
    costs = [
        f"{layer['architecture']} layer {layer['layer']}: {_x(layer['layer_cost_ratio']['pair_median'])} "
        f"(attention alone {_x(layer['attention_cost_ratio']['pair_median'])})"
        if "error" not in layer
        else f"{layer['architecture']}: {layer['error']}"
        for layer in entry["layers"]
    ]
    return f"ok in {took}: merge layer cost, iLLaVA / stock: " + "; ".join(costs)


def run(plan: Plan, out: Path, budget_s: float, rows: set[int] | None = None) -> list[dict]:
    models = Models(plan)
    runner = Runner(plan, out, budget_s, rows)
    runner.row(1, "image", lambda: bench_row(plan, models, "llava", "image"))
    runner.row(2, "video", lambda: bench_row(plan, models, "llava", "video", video=True))
    runner.row(3, "throughput", lambda: throughput_row(plan, models, ESTIMATE_S[3]))
    runner.row(4, "qwen2.5-vl image", lambda: bench_row(plan, models, "qwen", "image"))
    models.free()
    runner.row(5, "internvl image", lambda: bench_row(plan, models, "internvl", "image"))
    models.free()
    runner.row(6, "merge layer cost", lambda: merge_layer_row(plan, models))
    models.free()
    print(f"done in {runner.elapsed():.0f} s: {out}", flush=True)
    return runner.rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/gpu"), help="folder of gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, tiny configurations, 1 repeat")
    parser.add_argument("--budget-s", type=float, default=480, help="skip rows that would end after this")
    parser.add_argument("--repeats", type=int, default=5, help="alternated repeats on the GPU (dry run: 1)")
    parser.add_argument("--memory-cap-gb", type=float, help=f"throughput cap (GPU default: free - margin, <= "
                        f"{DEFAULT_CAP_GB:g} GB)")  # fmt: skip
    parser.add_argument("--rows", help="comma-separated row numbers to run (default: all)")
    args = parser.parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and lose a lot on a busy CPU
    plan = Plan.from_args(args)
    rows = {int(r) for r in args.rows.split(",")} if args.rows else None
    print(f"gpu.py: {device_name(plan)}, {plan.dtype}, budget {args.budget_s:.0f} s, out {args.out}", flush=True)
    run(plan, args.out / "gpu.json", args.budget_s, rows)


if __name__ == "__main__":
    main()
