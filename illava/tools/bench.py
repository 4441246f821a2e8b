"""Measure what iLLaVA buys: stock vs patched-but-disabled vs iLLaVA, alternated in one process.

Per repeat, each setting runs once in turn (A B C A B C ..., after warm-up); figures are the median
and the spread (min..max) over repeats:
- encoder time: the vision encoder's forward (hooks around it);
- prefill time: time to first token, i.e. one forward of the prompt with the cache (encoder included);
- decode tokens/s: ``new_tokens`` greedy steps with the cache after the prefill, per sample;
- end-to-end samples/s: ``generate(max_new_tokens=new_tokens)``;
- peak memory (once per setting, untimed): on CUDA the peak allocated during ``generate`` above
  what was allocated before; on CPU the peak of live tensor storage created during ``generate``
  (tracked op by op, so the allocator's caching does not blur it).
Visual tokens per stage come from ``illava.stats``; FLOPs from ``illava.tools.flops`` on those counts.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import api
from ..adapters import adapter_for
from ..config import IllavaConfig
from ..methods import scale_reduction
from .flops import prefill_flops
from .ratios import pair_ratios

METRICS = ("encoder_s", "prefill_s", "decode_tokens_per_s", "samples_per_s", "peak_memory_mb")
HIGHER_IS_BETTER = {"decode_tokens_per_s", "samples_per_s"}


@dataclass
class Setting:
    name: str
    config: object | None  # IllavaConfig, preset name, or None for the stock model


@dataclass
class Measured:
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    tokens: dict | None = None
    flops: dict | None = None
    stats: str = ""

    def summary(self) -> dict:
        out = {}
        for metric, vals in self.values.items():
            if vals:
                out[metric] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _EncoderTimer:
    """Adds up the wall time of every vision-encoder forward (synchronised on CUDA)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total = 0.0
        self._start = 0.0
        self.device = device
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        _sync(self.device)
        self.total += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of CPU tensor storage created while active (freed storages are subtracted):
    the CPU counterpart of CUDA's peak allocated memory, independent of the allocator's caching."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_memory_mb(model, inputs: dict, new_tokens: int, device: torch.device) -> float:
    """Peak memory of ``generate`` above what was allocated before (CUDA), or peak live CPU tensor
    memory created during it (CPU); weights and inputs already present are not counted."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model.generate(**inputs, **kwargs)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with _PeakTensorMemory() as tracker:
        model.generate(**inputs, **kwargs)
    return tracker.peak / 2**20


def _vision_module(model) -> torch.nn.Module:
    return adapter_for(model).parts(model).vision


def _use(model, setting: Setting) -> None:
    if setting.config is None:
        api.remove(model)
    else:
        api.apply(model, setting.config)


def _decode_steps(model, inputs: dict, new_tokens: int, device) -> float:
    """Seconds for ``new_tokens`` greedy steps with the cache after a prefill (as generate does)."""
    mask = inputs["attention_mask"]
    first = {k: v for k, v in inputs.items() if k != "attention_mask"}
    out = model(**first, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        step = {"input_ids": token, "attention_mask": mask, "cache": cache, "use_cache": True}
        step["position_ids"] = _next_positions(model, mask)
        out = model(**step)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def _next_positions(model, mask: torch.Tensor) -> torch.Tensor:
    """Position ids of the newest token, as generate() passes them (left padding respected;
    Qwen-VL: text position + the M-RoPE delta of the prefill, on all three axes)."""
    position = mask.long().cumsum(1)[:, -1:] - 1
    deltas = getattr(model.model, "rope_deltas", None)
    if deltas is None:
        return position
    return (position + deltas.to(position.device)).unsqueeze(0).expand(3, -1, -1)


def measure(
    model,
    inputs: dict,
    settings: list[Setting],
    *,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Measured]:
    """Run every setting once per repeat, in turn; return the measurements per setting."""
    device = next(model.parameters()).device
    results = {s.name: Measured() for s in settings}
    sequence = int(inputs["attention_mask"][0].sum())
    batch = inputs["input_ids"].shape[0]
    with torch.inference_mode():
        api.apply(model, IllavaConfig())  # stock compute, counted (statistics need an enabled patch)
        model(**inputs, use_cache=True, logits_to_keep=1)
        stock_counts = _counts(model, sequence, batch)
        for repeat in range(warmup + repeats):
            for setting in settings:
                _use(model, setting)
                timer = _EncoderTimer(_vision_module(model), device)
                _sync(device)
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _sync(device)
                prefill = time.perf_counter() - start
                encoder = timer.total
                timer.remove()
                decode = _decode_steps(model, inputs, new_tokens, device)
                _sync(device)
                start = time.perf_counter()
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                _sync(device)
                e2e = time.perf_counter() - start
                if repeat >= warmup:
                    m = results[setting.name]
                    timings = (encoder, prefill, batch * new_tokens / decode, batch / e2e)
                    for key, value in zip(METRICS, timings):
                        m.values[key].append(value)
                    if m.tokens is None:
                        stock = setting.config is None or not setting.config.enabled
                        counts = stock_counts if stock else _counts(model, sequence, batch)
                        m.tokens, m.flops, m.stats = counts
                        # memory is deterministic: measured once, untimed (tracking slows CPU runs)
                        m.values["peak_memory_mb"].append(peak_memory_mb(model, inputs, new_tokens, device))
                if progress:
                    progress(setting.name)
    api.remove(model)
    return results


def _counts(model, sequence: int, batch: int):
    """Visual tokens per stage, analytic FLOPs and the stats table of the last prefill."""
    stats = api.stats(model)
    return stats.visual_tokens(), prefill_flops(model, stats, sequence, batch), str(stats)


def ratios(results: dict[str, Measured], baseline: str, other: str) -> dict[str, float]:
    """baseline / other for times and memory, other / baseline for rates: > 1 means ``other`` is better."""
    base, new = results[baseline].summary(), results[other].summary()
    out = {}
    for metric in METRICS:
        if metric in base and metric in new and base[metric]["median"] and new[metric]["median"]:
            b, n = base[metric]["median"], new[metric]["median"]
            out[metric] = n / b if metric in HIGHER_IS_BETTER else b / n
    return out


# ------------------------------------------------------------------------------------ runner
def default_image():
    """The bundled default: a real photo (scikit-image's astronaut) at 384x384, one LLaVA crop."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((384, 384))


def default_video(frames: int = 8):
    """The bundled default video: a slow pan and rotation over a real photo."""
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    return [photo.rotate(2 * i).crop((8 * i, 8 * i, 8 * i + 448, 8 * i + 448)) for i in range(frames)]


def load_model(model: str | None, arch: str | None, dtype: torch.dtype, device: str):
    """A model from the hub / a local folder, or a bundled architecture with random weights."""
    from .architectures import build_architecture

    if (model is None) == (arch is None):
        raise ValueError("give exactly one of a model (hub id or local folder) or --arch")
    if arch is not None:
        torch.manual_seed(0)
        return build_architecture(arch, dtype=dtype).to(device), arch
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
    return loaded, model


def make_inputs(model, source: str | None, images, videos, batch_size: int) -> dict:
    """Stock inputs (random text ids around the stock placeholders: speed does not depend on them);
    the image processor of ``source`` (hub id or folder) when it has one, else the family's."""
    from .inputs import placeholder_inputs, repeat_batch

    processor = None
    if source is not None:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError, ImportError):
            processor = None
    inputs = placeholder_inputs(model.config, images, videos, image_processor=processor)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = {}
    for key, value in repeat_batch(dict(inputs), batch_size).items():
        value = value.to(device)
        out[key] = value.to(dtype) if key.startswith("pixel_values") else value
    return out


def sweep_config(base, level: float, unit: int = 1):
    """``base`` with its reduction scaled by ``level`` (``illava.methods.scale_reduction``)."""
    return scale_reduction(base, level, unit)


def run_bench(
    model,
    name: str,
    inputs: dict,
    config,
    *,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    sweep: list[float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Stock vs patched-but-disabled vs iLLaVA (and sweep levels), alternated; a JSON-able report."""
    cfg = api.configure(model, config)
    settings = [Setting("stock", None), Setting("disabled", cfg.replace(enabled=False)), Setting("illava", cfg)]
    levels = sorted(sweep or [])
    settings += [Setting(f"level {level:g}", sweep_config(cfg, level)) for level in levels]
    results = measure(model, inputs, settings, new_tokens=new_tokens, repeats=repeats, warmup=warmup, progress=progress)
    device = next(model.parameters()).device
    report = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "batch_size": int(inputs["input_ids"].shape[0]),
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "config": _config_dict(cfg),
        "settings": {
            s.name: {
                "config": None if s.config is None else _config_dict(s.config),
                "metrics": results[s.name].summary(),
                "visual_tokens": results[s.name].tokens,
                "gflops": results[s.name].flops,
                "stats": results[s.name].stats,
            }
            for s in settings
        },
        "ratios": {s.name: ratios(results, "stock", s.name) for s in settings if s.name != "stock"},
    }
    for s in settings:
        if s.name == "stock":
            continue
        entry = report["settings"][s.name]
        predicted = report["settings"]["stock"]["gflops"]["total"] / entry["gflops"]["total"]
        entry["flops_predicted_prefill_speedup"] = predicted
        entry["prefill_speedup_share_of_predicted"] = report["ratios"][s.name].get("prefill_s", 0) / predicted
    return report


def _config_dict(cfg) -> dict:
    from dataclasses import asdict

    fields = {k: v for k, v in asdict(cfg).items() if k not in ("preset", "policy")}
    return fields | {"preset": cfg.preset, "policy": None if cfg.policy is None else cfg.policy.name}


def plot_sweep(report: dict, path: str) -> None:
    """Speedups and the share of visual tokens kept, per reduction level (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = report["settings"]["stock"]["visual_tokens"]["stock"]
    points = sorted(
        (100 * report["settings"][n]["visual_tokens"]["after_llm"] / stock, n)
        for n in report["settings"]
        if n.startswith("level ") or n == "illava"
    )
    kept, names = [p[0] for p in points], [p[1] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric, label in (("prefill_s", "prefill"), ("samples_per_s", "end-to-end"), ("encoder_s", "encoder")):
        ax.plot(kept, [report["ratios"][n].get(metric, float("nan")) for n in names], "o-", label=f"{label} speedup")
    predicted = [report["settings"][n]["flops_predicted_prefill_speedup"] for n in names]
    ax.plot(kept, predicted, "k--", label="prefill speedup predicted by FLOPs")
    for x, n in zip(kept, names):
        ax.annotate(
            n.removeprefix("level "),
            (x, predicted[names.index(n)]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_xlabel("visual tokens kept after the LLM stage (% of stock)")
    ax.set_ylabel("speedup over stock (x)")
    ax.set_title(f"iLLaVA on {report['model']} ({report['device']}, {report['dtype']}, batch {report['batch_size']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ methods at one budget
def run_methods(
    model,
    name: str,
    inputs: dict,
    methods: list[str],
    *,
    budget: float | None = None,
    repeats: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Prefill time of every method against stock, alternated (stock, m1, m2, ..., stock, m1, ...),
    each at its published default or, with ``budget``, at the knob that gives that share of stock's
    prefill FLOPs on ``inputs`` (``illava.tools.budget``). Reports, per method, the FLOPs-predicted
    prefill speedup, the measured one (median of adjacent-pair ratios, and of the fastest runs) and
    the measured share of the predicted: what the method's own scoring / matching costs."""
    from ..methods import REGISTRY
    from .budget import Meter, solve

    meter = Meter(model, inputs)
    chosen = {}
    try:
        for method in methods:
            if budget is None:
                config = REGISTRY[method].config(model)
                point = meter.point(REGISTRY[method].default, config)
                chosen[method] = {
                    "knob": REGISTRY[method].default, "config": config, "share": point.gflops / meter.stock.gflops,
                    "reached": None, "tokens": point.tokens, "gflops": point.gflops,
                }  # fmt: skip
            else:
                s = solve(model, method, budget, inputs, meter=meter)
                chosen[method] = {
                    "knob": s.knob, "config": s.config, "share": s.share, "reached": s.reached, "tokens": s.tokens,
                    "gflops": s.gflops,
                }  # fmt: skip
            if progress:
                progress(f"solved {method}")
    finally:
        meter.close()
    device = next(model.parameters()).device
    times: dict[str, list[float]] = {"stock": [], **{m: [] for m in methods}}
    with torch.inference_mode():
        for repeat in range(warmup + repeats):
            for setting in times:
                if setting == "stock":
                    api.remove(model)
                else:
                    api.apply(model, chosen[setting]["config"])
                _sync(device)
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _sync(device)
                if repeat >= warmup:
                    times[setting].append(time.perf_counter() - start)
                if progress:
                    progress(setting)
    api.remove(model)
    rows = {}
    for method in methods:
        c = chosen[method]
        predicted = meter.stock.gflops / c["gflops"]
        measured = pair_ratios(times["stock"], times[method])
        rows[method] = {
            "knob": c["knob"],
            "config": _config_dict(c["config"]),
            "flops_share": c["share"],
            "budget_reached": c["reached"],
            "visual_tokens": c["tokens"],
            "gflops": c["gflops"],
            "prefill_s": times[method],
            "flops_predicted_prefill_speedup": predicted,
            "prefill_speedup": measured,
            "share_of_predicted": measured["pair_median"] / predicted if measured["pair_median"] else None,
        }
    return {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "batch_size": int(inputs["input_ids"].shape[0]),
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "budget": budget,
        "repeats": repeats,
        "warmup": warmup,
        "stock": {"prefill_s": times["stock"], "gflops": meter.stock.gflops, "visual_tokens": meter.stock.tokens},
        "methods": rows,
    }
