"""The layering of cmkit's modules (docs/design.md, "Layers"): a module may import its own layer or
lower ones, never a higher one, whether at the top of the file or inside a function; and the
modules import each other without cycles. `import cmkit` loads no heavy optional dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cmkit"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = [
    ("base", ["errors", "validate", "batch_rng", "noise", "discrete_vp", "condition", "safe_io", "plotting", "classes", "devices", "distributed",
              "checkpoint"]),
    ("networks and samplers", ["nets", "text", "latents", "sampling", "analytic", "metrics.frechet", "metrics.precision_recall",
                               "metrics.vectors", "metrics", "editing.operators"]),
    ("preconditioning", ["precond", "guidance"]),
    ("objectives and data", ["objectives", "data", "metrics.classifier", "metrics.inception"]),
    ("configs", ["config"]),
    ("runs", ["diffusers_runs", "run", "outputs"]),
    ("training, evaluation, export, editing", ["compiled_step", "training", "evaluate", "tune", "export", "editing"]),
    ("front ends", ["serve", "editing.cli", "demo", "cli", "__main__", ""]),
]


def layer_of(module: str) -> int:
    """The layer of ``module`` (dotted, relative to cmkit; "" is the package itself)."""
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"cmkit.{module} has no layer: add it to LAYERS"
    return level


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported cmkit module relative to cmkit, imported at module level) for each import."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "cmkit" or node.module.startswith("cmkit.")):
                target = node.module[len("cmkit."):] if node.module != "cmkit" else ""
            else:
                continue
            names = [f"{target}.{a.name}".lstrip(".") for a in node.names] if node.module is None else [target]
            found += [(_resolve(name), id(node) in top) for name in names]
        elif isinstance(node, ast.Import):
            found += [(_resolve(a.name[len("cmkit."):]), id(node) in top) for a in node.names
                      if a.name.startswith("cmkit.")]
    return found


def _resolve(name: str) -> str:
    """The module an import names ('run' for 'from .run import x'; names inside modules drop off)."""
    parts = name.split(".") if name else []
    while parts and not ((SRC / Path(*parts)).with_suffix(".py").is_file() or (SRC / Path(*parts)).is_dir()):
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    mine = layer_of(module)
    for target, _ in _imports(MODULES[module]):
        if target == "" and module != "":
            continue  # `from cmkit import __version__`-style reads of the package's own metadata
        assert layer_of(target) <= mine, (f"cmkit.{module} ({LAYERS[mine][0]}) imports cmkit.{target} "
                                          f"({LAYERS[layer_of(target)][0]}), a higher layer")


def test_imports_have_no_cycles():
    """Not at module level, and not through imports inside functions either (cli.py and
    editing/cli.py used to import each other that way)."""
    graph = {m: {t for t, _ in _imports(p) if t != m and t in MODULES} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + ".") or node == "":
                continue  # a package importing its own submodules
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_layer_check_catches_a_back_arrow(tmp_path, monkeypatch):
    """A low module that imports a higher one is reported (the check above can fail)."""
    fake = tmp_path / "cmkit"
    (fake / "objectives").mkdir(parents=True)
    (fake / "objectives" / "__init__.py").write_text("")
    (fake / "objectives" / "bad.py").write_text("def f():\n    from ..training import Trainer\n")
    (fake / "training.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert ("training", False) in _imports(fake / "objectives" / "bad.py")
    assert layer_of("training") > layer_of("objectives.bad")


def test_import_cmkit_loads_no_heavy_optional_dependency():
    heavy = ["diffusers", "matplotlib", "onnx", "onnxruntime", "fastapi", "uvicorn", "scipy", "sklearn", "PIL"]
    code = ("import sys, cmkit, cmkit.cli; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
