import re

from typer.testing import CliRunner

from illava.tools.cli import app


def test_default_command_runs_the_demo():
    """The main job: the shipped easy-VQA model on an easy-VQA test image, baseline vs iLLaVA."""
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    result = CliRunner().invoke(app, [], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Question: what is the red shape?" in out and "Reference answer (easy-VQA test split): triangle" in out
    assert re.search(r"baseline\s*│\s*triangle\s*│\s*406\s*│\s*406\s*│\s*406", out), out
    assert re.search(r"illava\s*│\s*triangle\s*│\s*406\s*│\s*206\s*│\s*144", out), out
    assert "prefill FLOPs cut 2.15x" in out and "measured prefill speedup" in out
    assert "L4: 121->96 per crop/frame" in out


def test_demo_with_own_image_question_and_preset(tmp_path):
    from PIL import Image, ImageDraw

    path = tmp_path / "blue_circle.png"
    picture = Image.new("RGB", (64, 64), (245, 240, 235))
    ImageDraw.Draw(picture).ellipse((14, 14, 50, 50), fill=(0, 0, 255))
    picture.save(path)
    args = ["demo", "--image", str(path), "--question", "what color is the shape?", "--preset", "encoder-only"]
    result = CliRunner().invoke(app, [*args, "--repeats", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "encoder-only" in result.output and "Reference answer" not in result.output
    assert re.search(r"baseline\s*│\s*blue\s*│", result.output), result.output


def test_demo_without_a_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--model", str(tmp_path), "--repeats", "1"])
    assert result.exit_code == 2 and "no easy-VQA model" in result.output


def test_unknown_preset_is_a_clear_error():
    result = CliRunner().invoke(app, ["demo", "--preset", "turbo", "--repeats", "1"])
    assert result.exit_code == 2
    assert "unknown iLLaVA preset 'turbo'" in result.output
