"""The package's structure (issue 36): no import cycle inside ``illava/`` (imports inside functions
included), no engine importing another, no engine-neutral module importing an engine or the tools,
and one family record (``illava.families``) that both engines read the same numbers from."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import FAMILIES
from transformers import AutoModelForImageTextToText

import illava
from illava.config import PRESETS
from illava.families import RECORDS, record_for
from illava.presets import preset
from illava.tools.architectures import tiny_config

ROOT = Path(illava.__file__).parent

# the engines, by the packages and modules that make them up
ENGINES = {
    "transformers": ("illava.hf", "illava.adapters", "illava.api", "illava.patch"),
    "vllm": ("illava.vllm",),
}
# what every engine reads: none of them imports an engine or the tools
NEUTRAL = (
    "illava.config", "illava.methods", "illava.policy", "illava.merge", "illava.peers", "illava.plan",
    "illava.presets", "illava.families", "illava.tuned", "illava.resolve",
)  # fmt: skip


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``illava`` modules it imports, anywhere in its file (module level or inside a
    function), from the AST; ``from package import name`` counts as the submodule when there is one."""
    modules = _modules()

    def base_of(module: str, level: int, name: str | None) -> str:
        parts = module.split(".")
        package = parts if modules[module].name == "__init__.py" else parts[:-1]
        package = package[: len(package) - (level - 1)]
        return ".".join(package + ([name] if name else []))

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = base_of(module, node.level, node.module) if node.level else node.module
                if not target or not _within(target, ("illava",)):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if _within(a.name, ("illava",)))
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle through
    all of its modules' edges inside it (a path that closes)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return [_one_cycle(graph, set(c)) for c in components]


def _one_cycle(graph, component: set[str]) -> list[str]:
    """A closed path inside ``component``: from its first module, the shortest way back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_illava():
    graph = import_graph()
    assert "illava.config" in graph and "illava.adapters.base" in graph
    found = cycles(graph)
    assert not found, "import cycles (lazy imports included):\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_engine_imports_another_and_the_neutral_layer_imports_none():
    bad = []
    for module, targets in import_graph().items():
        for engine, packages in ENGINES.items():
            if not _within(module, packages):
                continue
            others = [p for e, ps in ENGINES.items() if e != engine for p in ps]
            bad += [f"{module} ({engine}) imports {t}" for t in sorted(targets) if _within(t, others)]
        if _within(module, NEUTRAL):
            engines = [p for ps in ENGINES.values() for p in ps] + ["illava.tools"]
            bad += [f"{module} (engine-neutral) imports {t}" for t in sorted(targets) if _within(t, engines)]
    assert not bad, "\n".join(bad)


def test_from_preset_imports_no_engine():
    """``IllavaConfig.from_preset`` reads the family records, not an engine (it works where only the
    vLLM plugin's transformers is installed)."""
    code = (
        "import sys\n"
        "from illava.config import IllavaConfig\n"
        "c = IllavaConfig.from_preset('image', encoder_depth=24, tokens_per_crop=576, llm_depth=32, family='llava')\n"
        "assert c.encoder_layers == (5, 6, 7, 8) and c.llm_layers == (9,), c\n"
        "engines = ('illava.hf', 'illava.adapters', 'illava.api', 'illava.patch', 'illava.vllm', 'illava.tools')\n"
        "loaded = [m for m in sys.modules if m.startswith(engines)]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_adapter_reads_its_record():
    from illava.adapters import ADAPTERS

    assert {a.record for a in ADAPTERS} == set(RECORDS)
    for adapter in ADAPTERS:
        record = adapter.record
        assert adapter.config_types == record.model_types and adapter.model_classes == record.model_classes
        assert (adapter.unit, adapter.keep_first) == (record.unit, record.keep_first)
        assert adapter.renumber_positions == record.renumber_positions and adapter.presets is record.presets
    types = [t for r in RECORDS for t in r.model_types]
    assert len(types) == len(set(types))
    with pytest.raises(TypeError, match="does not support model type"):
        record_for("bert")


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_the_record_gives_the_adapters_numbers(fam):
    """On every tiny model: the record's dimensions, merge layers, leading tokens and presets (read
    from the configuration) are those the transformers backend's adapter reads from the model."""
    from illava.adapters import adapter_for

    config = tiny_config(fam.architecture)
    model = _meta_model(config)
    adapter, record = adapter_for(model), record_for(config.model_type)
    assert adapter.record is record
    assert record.dimensions(config) == adapter.dimensions(model)
    assert record.mergeable_layers(config) == adapter.mergeable_layers(model)
    assert record.keep_first_of(config) == adapter.keep_first
    assert record.takes_video == fam.videos
    for name in PRESETS:
        assert preset(config, name) == adapter.preset(model, name) == illava.configure(model, name)


@pytest.mark.parametrize(
    "arch, served", [("tiny-llava", "llava"), ("tiny-qwen2-vl", "qwen_vl"), ("tiny-qwen2.5-vl", "qwen_vl")]
)
def test_the_vllm_family_agrees_with_the_record(arch, served):
    from illava.vllm import families as vllm_families
    from illava.vllm.config import _Target

    config = tiny_config(arch)
    family = getattr(vllm_families, served)(config)
    record = record_for(config.model_type)
    dims = record.dimensions(config)
    assert (family.encoder_depth, family.tokens_per_crop, family.llm_depth, family.feature_layer, family.unit) == (
        dims.encoder_depth,
        dims.tokens_per_crop,
        dims.llm_depth,
        dims.feature_layer,
        dims.unit,
    )
    assert family.mergeable == record.mergeable_layers(config)
    assert (family.model_type, family.name) == (config.model_type, record.label(config.model_type))
    for name in PRESETS:
        assert _Target(family).preset(name) == preset(config, name)
    assert _Target(family).dimensions == dims


def test_the_merge_kernels_are_written_once_in_the_plan_layer():
    """Issue 36: the engines run the plan's kernels on their own modules; none of them computes the
    received attention or a merge step itself (a copy would drift from the other engine's)."""
    import re

    kernels = ("attention_with_received_scores", "reduce_units", "cls_received")
    root = Path(illava.__file__).parent
    offenders = []
    for path in [*root.glob("hf/*.py"), *root.glob("adapters/*.py"), *root.glob("vllm/*.py")]:
        code = re.sub(r'"""[\s\S]*?"""', "", path.read_text())  # docstrings may name them
        for name in kernels:  # the pieces the plan's kernels are made of: called only there
            if re.search(rf"(?<![\w]){name}\(", code):
                offenders.append(f"{path.relative_to(root)}: {name}")
    assert not offenders, offenders
    from illava.plan import encoder as plan

    for name in ("attend_and_score", "to_block_order", "frames_attention", "merge_frames", "merge_units"):
        assert callable(getattr(plan, name))


def test_no_family_forward_branches_on_recording():
    """Issue 36: what ``viz`` draws is derived after the forward from the typed call object
    (``FeatureCalls._illava_units`` reading ``EncoderCall.layout`` / ``crop_trace`` / ``vision_run``);
    no family's forward asks whether it is being recorded (``tests/test_viz.py`` checks the derived
    tracking against the decoder input of every family)."""
    import re

    root = Path(illava.__file__).parent
    offenders = []
    for path in [*root.glob("adapters/*.py"), *root.glob("vllm/*.py")]:
        code = re.sub(r'"""[\s\S]*?"""', "", path.read_text())
        if re.search(r"recording\(|scope\.record\b", code):
            offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders
    from illava.adapters import ADAPTERS
    from illava.hf.encoder import FeatureCalls

    missing = [type(a).__name__ for a in ADAPTERS if a.model_mixin._illava_units is FeatureCalls._illava_units]
    assert not missing, missing  # every family derives its tracking
