"""Package direction: `results` stays light, `model_zoo` sits below the engine, and no module
imports another that (explicitly) imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("harness", "model_zoo", "results")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path], name: str) -> set[str]:
    """First-party modules a file imports at module level (a `from pkg import sub` names the
    submodule when there is one)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules, name) for name, path in modules.items()}


def test_results_imports_neither_torch_nor_timm_nor_ray():
    code = (
        "import sys, results; results.load; "
        "print(sorted({'torch', 'timm', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_model_zoo_imports_only_the_dependency_free_base_of_harness():
    graph = _graph()
    base = {"harness.errors", "harness.registry"}
    for name, deps in graph.items():
        if name.startswith("model_zoo"):
            engine = {d for d in deps if d.startswith("harness")}
            assert engine <= base, f"{name} imports {engine - base}"


def test_results_imports_no_engine_module():
    graph = _graph()
    light = {"harness.fs", "harness.errors"}
    for name, deps in graph.items():
        if name.startswith("results"):
            engine = {d for d in deps if d.startswith(("harness", "model_zoo"))}
            assert engine <= light, f"{name} imports {engine - light}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_function_level_imports_are_commented_start_up_laziness():
    """An import inside a function must say why (start-up time), never dodge a cycle."""
    allowed = {ROOT / "harness" / "cli.py"}  # every subcommand imports only what it runs
    offenders = []
    for path in _modules().values():
        if path in allowed:
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        line = lines[inner.lineno - 1]
                        if "# lazy" not in line:
                            offenders.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {line}")
    assert not offenders, "\n".join(offenders)


def _plugin_references(tree: ast.AST, names: set[str]) -> list[str]:
    """Places where code singles out a plug-in by name: compared with one (`method ==
    "uchida"`, `in ("jia", ...)`) or asking a registry for one (`METHODS.get("jia")`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            parts += [e for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set))
                      for e in p.elts]  # fmt: skip
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) in ("get", "create_method", "create_attack"):  # fmt: skip
            parts = list(node.args)
        else:
            continue
        found += [f"line {p.lineno}: {p.value!r}" for p in parts
                  if isinstance(p, ast.Constant) and p.value in names]  # fmt: skip
    return found


def test_engine_modules_name_no_plugin():
    """Plug-ins are found through the registries: the engine and results never single one
    out. Names that cannot be ordinary words (trigger_set, steg_passport, ...) may not
    appear at all, not even in a docstring; short ones (`content`, `noise`) may not be
    compared with or looked up by name."""
    from harness.methods import METHODS

    names = {n for n in METHODS.list() if n != "none"}
    distinctive = {n for n in names if "_" in n}
    files = [ROOT / "harness" / f for f in ("cli.py", "config.py", "stages.py", "scheduler.py")]
    files += list((ROOT / "results").glob("*.py"))
    for path in files:
        text = path.read_text()
        assert not [n for n in distinctive if n in text], f"{path.name} names a plug-in"
        refs = _plugin_references(ast.parse(text), names)
        assert not refs, f"{path.name} singles out a plug-in: {refs}"


def test_the_plugin_reference_check_catches_comparisons_and_lookups():
    code = (
        'if row.method == "uchida": pass\nx = METHODS.get("jia")\n'
        'y = m in ("content", "b")\nz = Literal["noise"]\nw = Field("noise")\n'
    )
    found = _plugin_references(ast.parse(code), {"uchida", "jia", "content", "noise"})
    assert found == ["line 1: 'uchida'", "line 2: 'jia'", "line 3: 'content'"]
