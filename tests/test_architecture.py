"""The package layout's rules (docs/architecture.md), checked on the source: no import cycle between modules
(function-level imports included), and which subpackage may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("persllm_jax", "data_gen")

# top-level modules of persllm_jax that every layer may use (they import nothing of ours but each other)
FOUNDATION = ("persllm_jax", "persllm_jax.errors", "persllm_jax.io", "persllm_jax.settings", "persllm_jax.outputs",
              "persllm_jax.formats")

# subpackage (or module) -> what it may import of ours, besides itself and FOUNDATION
MAY_IMPORT = {
    "persllm_jax.model": (),
    "persllm_jax.runs": ("persllm_jax.model", "persllm_jax.train.checkpoint"),
    "persllm_jax.train": ("persllm_jax.model", "persllm_jax.runs"),
    "persllm_jax.export": ("persllm_jax.model", "persllm_jax.runs"),
    "persllm_jax.serve": ("persllm_jax.model", "persllm_jax.runs", "data_gen"),
    # the serving plan compiles serve's programs with the plan's toolchain (TPU targets, worker, capacities)
    "persllm_jax.serve.plan": ("persllm_jax.model", "persllm_jax.serve", "persllm_jax.train.plan",
                               "persllm_jax.train.tpu_plan"),
    "persllm_jax.eval": ("persllm_jax.model", "persllm_jax.runs", "persllm_jax.serve", "data_gen"),
    "persllm_jax.pipeline": ("persllm_jax.model", "persllm_jax.runs", "persllm_jax.train", "persllm_jax.export",
                             "persllm_jax.eval", "data_gen"),
    "persllm_jax.generate": ("persllm_jax.serve",),  # the old import path, kept for one release
    "persllm_jax.cli": ("persllm_jax", "data_gen"),
    "persllm_jax.__main__": ("persllm_jax.cli",),  # python -m persllm_jax
    # data_gen builds corpora on its own; the local annotator model is its one way into the trainer's code
    "data_gen": (),
    "data_gen.backends": ("persllm_jax.serve.engine", "persllm_jax.model"),
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its source (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of `pkg`
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a module we have, or its nearest package
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cyc = visit(m)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cyc = visit(n)
            if cyc:
                return cyc
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_tools_scripts_do_not_import_each_other_in_a_cycle():
    scripts = {f.stem: f for f in (REPO / "tools").glob("*.py")}
    graph = {}
    for name, f in scripts.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in scripts:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in scripts}
        graph[name] = deps
    assert find_cycle(graph) is None


def layer_of(name: str) -> str | None:
    """The most specific MAY_IMPORT entry that `name` belongs to."""
    best = None
    for layer in MAY_IMPORT:
        if (name == layer or name.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def allowed(importer: str, imported: str) -> bool:
    layer = layer_of(importer)
    if imported in FOUNDATION:
        return True
    if layer is None:
        return importer in FOUNDATION and imported in FOUNDATION
    own = layer if layer != "data_gen.backends" else "data_gen"
    if imported == own or imported.startswith(own + "."):
        return True
    return any(imported == ok or imported.startswith(ok + ".") for ok in MAY_IMPORT[layer])


def test_every_module_belongs_to_a_layer(graph):
    stray = [m for m in graph if layer_of(m) is None and m not in FOUNDATION]
    assert not stray, f"modules outside the layout of docs/architecture.md: {stray}"


def test_layering_rule(graph):
    bad = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps if not allowed(a, b))
    assert not bad, "imports that break the layering rule of docs/architecture.md:\n" + "\n".join(bad)


def test_the_layering_rule_rejects_what_it_should():
    assert not allowed("persllm_jax.train.sft", "persllm_jax.export.driver")
    assert not allowed("persllm_jax.train.dpo", "persllm_jax.serve.engine")
    assert not allowed("persllm_jax.model.decoder", "persllm_jax.train.sharding")
    assert not allowed("data_gen.pipeline", "persllm_jax.model.weights")
    assert allowed("data_gen.backends", "persllm_jax.serve.engine")
    assert allowed("persllm_jax.cli.train", "persllm_jax.train.sft")


def test_only_cli_imports_click():
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "click" or m.startswith("click.") for m in mods):
                users.append(name)
    assert users and all(u == "persllm_jax.cli" or u.startswith("persllm_jax.cli.") for u in users), users


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted((REPO / "persllm_jax").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "may import" in doc.lower(), f"{init.relative_to(REPO)}: docstring must say what it may import"
