import re

from typer.testing import CliRunner

from illava.cli import app


def test_default_command_runs_the_demo():
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "baseline" in out and "illava" in out and "prefill speedup" in out
    # the real photo (451x300, AnyRes 2x3 grid on 64px crops) gives 464 stock visual tokens
    assert re.search(r"baseline.*464.*464.*464", out)
    assert "L4: 40->32 per crop/frame" in out


def test_demo_with_own_image_and_preset(tmp_path):
    from PIL import Image
    from skimage import data

    path = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    result = CliRunner().invoke(app, ["demo", "--image", str(path), "--preset", "encoder-only", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "encoder-only" in result.output


def test_unknown_preset_is_a_clear_error():
    result = CliRunner().invoke(app, ["demo", "--preset", "turbo", "--repeats", "1"])
    assert result.exit_code == 2
    assert "unknown iLLaVA preset 'turbo'" in result.output
