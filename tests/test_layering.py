"""The package's import graph: no cycles, and no module imports a layer above its own.

Layers, lowest first (a module may import its own layer and those below):

    base      models, tokenizer, data, rewards, curriculum, metrics, plot, cli, checkpoints,
              sharding, training (the kit every tuning loop shares: optimizer, TrainState,
              policy log-probs)
    sampling  the jitted sampler
    env       search engines and the agent (template, rollouts, warm-up demonstrations)
    rl        estimators, losses, packing, the learner's step
    stages    what a run reads (`inputs`) and the simulator-tuning pipeline
    drivers   train, evaluate, sweep, chat

Imports anywhere in a file count (inside functions too): a cycle hidden in a function is
still a cycle. A module's private names (a leading underscore) stay in their module: no other
module imports them.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "zerosearch_jax"
LAYERS = {
    "base": ("models", "tokenizer", "data", "rewards", "curriculum", "metrics", "plot", "cli",
             "checkpoints", "sharding", "training", "settings", "packing"),
    "sampling": ("sampling",),
    "env": ("search", "agent"),
    "rl": ("rl",),
    "stages": ("inputs", "simulator_sft", "stages", "hooks"),
    "drivers": ("train", "evaluate", "sweep", "chat"),
}
ORDER = list(LAYERS)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("zerosearch_jax"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("zerosearch_jax.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself
    for i, name in enumerate(ORDER):
        if parts[1] in LAYERS[name]:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, deps in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} ({ORDER[mine]}) imports {dep} ({ORDER[theirs]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_no_private_name_is_imported_from_another_module():
    private = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("zerosearch_jax"):
                private += [f"{path.name}: from {node.module} import {a.name}"
                           for a in node.names if a.name.startswith("_")]
    assert not private, "\n".join(private)
