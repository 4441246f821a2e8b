"""The ``illava`` command line. With no command it runs the embedded demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .config import PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=False, help="iLLaVA token merging for transformers VLMs.")
console = Console()


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """Run the embedded demo when no command is given."""
    if ctx.invoked_subcommand is None:
        demo()


@app.command()
def demo(
    image: Annotated[Path | None, typer.Option(help="Image file (default: a photo shipped by scikit-image).")] = None,
    question: Annotated[str, typer.Option(help="Question about the image.")] = "What is shown in this image?",
    preset: Annotated[str, typer.Option(help="iLLaVA preset to compare with the stock model.")] = "image",
    repeats: Annotated[int, typer.Option(min=1, help="Timed prefills per setting (alternating).")] = 5,
) -> None:
    """Answer a question about a real photo with the stock model and with iLLaVA, side by side."""
    from PIL import Image

    from .demo import run_demo

    if preset not in PRESETS:
        console.print(f"[red]unknown iLLaVA preset {preset!r}; choose one of {list(PRESETS)}[/red]")
        raise typer.Exit(2)
    picture = Image.open(image).convert("RGB") if image is not None else None
    with console.status("building the default model and running baseline vs iLLaVA..."):
        results = run_demo(picture, question, preset, repeats=repeats)
    console.print(f"[bold]Question:[/bold] {question}")
    console.print("[dim]Default model: tiny LLaVA-OneVision with random weights (the answer is noise).[/dim]")
    table = Table(title=f"baseline vs iLLaVA (preset '{preset}')")
    for column in ("", "answer", "visual tokens in", "after encoder stage", "after LLM stage", "prefill (median)"):
        table.add_column(column)
    for name, r in results.items():
        v = r.visual_tokens
        table.add_row(
            name,
            r.answer or "(empty)",
            str(v["stock"]),
            str(v["after_encoder"]),
            str(v["after_llm"]),
            f"{r.prefill_seconds * 1000:.1f} ms",
        )
    console.print(table)
    speedup = results["baseline"].prefill_seconds / results["illava"].prefill_seconds
    console.print(f"prefill speedup (CPU, this tiny model): {speedup:.2f}x")
    console.print("[bold]iLLaVA tokens per stage:[/bold]\n" + results["illava"].stats)


if __name__ == "__main__":
    app()
