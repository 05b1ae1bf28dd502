"""The architecture as a test: layers that import only below them, no import circle, one place per rule.

The import graph is read from the source (every `import`, lazy ones inside functions included), so a
circle cannot hide behind a function-level import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import onnxpipe
import onnxpipe.models

PIPELINE = Path(onnxpipe.__file__).parent
MODELS = Path(onnxpipe.models.__file__).parent

# (layer, module-name prefixes), bottom first: a module may import its own layer or the ones below.
LAYERS = [
    (0, ("onnxpipe", "onnxpipe.errors", "onnxpipe.atomic")),
    (1, ("onnxpipe.runfolder",)),
    (2, ("onnxpipe.core", "onnxpipe.models")),
    (3, ("onnxpipe.stages",)),
    (4, ("onnxpipe.orchestrate",)),
    (5, ("onnxpipe.cli", "onnxpipe.console", "onnxpipe.serving")),
]


def modules() -> dict[str, Path]:
    out = {}
    for base, root in (("onnxpipe", PIPELINE), ("onnxpipe.models", MODELS)):
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([base, *parts])] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of this project it imports}, from every import statement of its source."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        package = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    edges[m].add(name)
    return edges


def layer_of(module: str) -> int:
    best = max(((len(p), layer) for layer, prefixes in LAYERS for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (and to README's Layout)"
    return best[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    edges = import_graph()
    assert len(edges) > 40  # the scan found the package
    assert cycles(edges) == []


def test_every_module_imports_only_its_own_layer_or_below():
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in import_graph().items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert bad == []


def test_the_run_folder_knows_no_stage_and_no_model_library():
    deps = import_graph()["onnxpipe.runfolder"]
    assert deps <= {"onnxpipe", "onnxpipe.errors", "onnxpipe.atomic"}, deps


def test_a_planted_circle_is_caught(tmp_path):
    """The checker itself can fail: a lazy import upward is an edge like any other."""
    edges = {"a": {"b"}, "b": set(), "c": set()}
    assert cycles(edges) == []
    edges["b"].add("a")
    assert cycles(edges) == [["a", "b"]]


def _manifest_subscripts(path: Path) -> list[int]:
    """Lines of `<x>.manifest[...]` subscripts or `<x>.manifest.<method>(...)` calls in a file."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        target = node.value if isinstance(node, ast.Subscript) else (
            node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None)
        if isinstance(target, ast.Attribute) and target.attr == "manifest":
            lines.append(node.lineno)
    return lines


def test_raw_manifest_access_stays_in_the_run_folder_module():
    offenders = {str(f.relative_to(PIPELINE)): lines for m, f in modules().items()
                 if f.name != "runfolder.py" and (lines := _manifest_subscripts(f))}
    assert offenders == {}


def test_no_rule_is_written_twice():
    """Tolerances and budgets, the normalization and the verdict words each live in one module."""
    import re

    rules = {
        r"\b(atol|rtol|min_agreement|max_accuracy_drop)\s*(:\s*float\s*)?=\s*(\d*\.\d+|\d+e-\d+)": "onnxpipe.core.policy",
        r"1e-4\s*\+\s*1e-3": "nowhere",
        r"[\"']over budget[\"']": "onnxpipe.core.policy",
        r"\*\s*np\.float32\(norm\[": "onnxpipe.core.data",
        r"- norm\[\"mean\"\]|- ds\[\"normalization\"\]": "nowhere",
    }
    sources = {m: f.read_text() for m, f in modules().items()}
    for pattern, home in rules.items():
        where = sorted(m for m, s in sources.items() if re.search(pattern, s))
        assert where == ([] if home == "nowhere" else [home]), f"{pattern!r} appears in {where}; it belongs in {home}"


def test_a_user_models_package_and_ort_transformers_do_not_shadow_ours(tmp_path):
    """Our models install as onnxpipe.models: a user's own top-level `models` package and the `models`
    folder that onnxruntime.transformers appends to sys.path both stay out of the way."""
    user = tmp_path / "models"
    user.mkdir()
    (user / "__init__.py").write_text("MINE = True\n")
    (user / "net.py").write_text("def build():\n    return 1\n")
    code = ("import onnxruntime.transformers, sys\n"
            "import models, models.net\n"
            "from onnxpipe.models import list_models\n"
            "from onnxpipe.stages import quantize\n"
            "assert models.MINE and models.net.build() == 1, models\n"
            "print(list_models())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'cnn'" in out.stdout and "'transformer'" in out.stdout


@pytest.mark.parametrize("command", ["--help", "run --help", "quantize --help"])
def test_help_is_instant_and_imports_nothing_heavy(command):
    code = ("import sys\nfrom onnxpipe.cli import app\n"
            f"try:\n    app({command.split()!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'sklearn', 'starlette') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_a_models_own_parity_overrides_reach_every_stage_config(tiny_run, copy_run_to, tmp_path):
    """ModelSpec.parity (the policy's per-model overrides) sets the defaults of export, optimize, quantize,
    verify and distill for that model's runs; a flag or a config section still wins."""
    import dataclasses

    from onnxpipe.core.policy import POLICY, policy_for
    from onnxpipe.models import get_model, register_model
    from onnxpipe.orchestrate import Context
    from onnxpipe.runfolder import Run
    from onnxpipe.stages.configs import DistillConfig, ExportConfig, QuantizeConfig, VerifyConfig

    name = "cnn_loose_parity"
    try:
        spec = get_model(name)
    except Exception:
        spec = register_model(dataclasses.replace(get_model("cnn"), name=name, parity={
            "atol": 5e-3, "max_accuracy_drop": 2.0, "student_max_accuracy_drop": 3.0}))
    assert policy_for(spec).tensor.atol == 5e-3 and policy_for(get_model("cnn")) is POLICY
    root = copy_run_to(tiny_run("cnn"), tmp_path)
    m = Run.open(root)

    class Named(Run):  # the same run folder, read as if its model were the overriding spec
        @property
        def spec(self):
            return spec

    run = Named(root, m.manifest)
    ctx = Context(flags={"verify": {"atol": 1e-6}})
    assert ctx.config(ExportConfig, "export", run).atol == 5e-3
    assert ctx.config(ExportConfig, "export", m).atol == POLICY.tensor.atol
    assert ctx.config(QuantizeConfig, "quantize", run).max_accuracy_drop == 2.0
    assert ctx.config(DistillConfig, "distill", run).max_accuracy_drop == 3.0
    assert ctx.config(VerifyConfig, "verify", run).atol == 1e-6  # the flag wins
