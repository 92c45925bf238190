"""The picture of the architecture: rubrax's import graph, read statically.

Every module of the package sits in one layer (LAYERS, bottom first; the package
docstring of rubrax/__init__.py says the same). A module may import modules of its own
layer or of lower layers, never of a higher one, and the graph has no cycle. Every
import counts: top level, inside functions, under `if TYPE_CHECKING`. A package's
__init__ is a module like any other; importing a submodule is not an import of its
package. A new module must be placed in LAYERS before this test passes.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rubrax

ROOT = Path(rubrax.__file__).parent

# (layer name, modules). An entry names a module, or with ".*" a package and everything
# under it; the most specific entry wins (rubrax.theory.cli is an entry point although
# rubrax.theory.* are leaves). Modules other helpers are adding are listed ahead.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", (
        "rubrax", "rubrax.rubric", "rubrax.data.*", "rubrax.theory.*", "rubrax.hostmem", "rubrax.jaxcache", "rubrax.runs",
        "rubrax.validate", "rubrax.pytree",
    )),
    ("device core", (
        "rubrax.policy", "rubrax.models.*", "rubrax.sharding", "rubrax.rl.step", "rubrax.rl.batch", "rubrax.rl.losses",
        "rubrax.rl.advantages", "rubrax.rl.state", "rubrax.train.optim", "rubrax.train.checkpoint",
    )),
    ("rewards", ("rubrax.rewards.*", "rubrax.rl.toy")),
    ("workflows", (
        "rubrax.rl", "rubrax.rl.loop", "rubrax.rl.prompts", "rubrax.rl.rollouts", "rubrax.rl.reward_runner", "rubrax.rl.resume",
        "rubrax.rl.runlog", "rubrax.rl.hooks", "rubrax.rl.recipe", "rubrax.train", "rubrax.train.trainer", "rubrax.train.metrics",
        "rubrax.train.sft", "rubrax.train.presets", "rubrax.train.reward_model", "rubrax.train.pair_sets", "rubrax.elicit.*", "rubrax.eval.*",
        "rubrax.generate", "rubrax.plan", "rubrax.report", "rubrax.rl.export", "rubrax.pipeline.*", "rubrax.forecast",
        "rubrax.rl.monitor",
        # the endpoint flags every endpoint job shares live here, and rubrax.generate (which
        # registers its own sub-command) uses them: so this CLI module sits with the workflows
        "rubrax.elicit.cli",
    )),
    ("testbed", ("rubrax.sim.*",)),
    ("entry points", (
        "rubrax.cli", "rubrax.main_job", "rubrax.eval.cli", "rubrax.rl.cli", "rubrax.sim.cli",
        "rubrax.theory.cli", "rubrax.train.cli",
    )),
)  # fmt: skip
LAYER_NAMES = [name for name, _ in LAYERS]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of the package in folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int | None:
    """Index of the module's layer: an exact entry first, else the longest "pkg.*" entry."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry == module:
                return i
            if entry.endswith(".*"):
                pkg = entry[:-2]
                if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > best_len:
                    best, best_len = i, len(pkg)
    return best


def imports_of(module: str, path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule sub when there is one
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != module}


def _string_constants(tree: ast.AST) -> list[str]:
    """The string constants of a module that are not docstrings."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def read_sources(root: Path) -> dict[str, dict[str, list[str]]]:
    """{"imports": {module: modules it imports}, "strings": {module: its string constants}}."""
    files = module_files(root)
    out: dict[str, dict[str, list[str]]] = {"imports": {}, "strings": {}}
    for m, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out["imports"][m] = sorted(imports_of(m, path, tree, set(files)))
        out["strings"][m] = _string_constants(tree)
    return out


def static_facts(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """`read_sources(root)`, run in a fresh interpreter: CPython 3.11.7's ast.parse can raise
    "AST constructor recursion depth mismatch" once other tests have run in this process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, env=env, check=True, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def facts() -> dict[str, dict[str, list[str]]]:
    return static_facts()


@pytest.fixture(scope="module")
def graph(facts) -> dict[str, set[str]]:
    return {m: set(deps) for m, deps in facts["imports"].items()}


def test_every_module_is_placed_in_a_layer(graph):
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, (
        f"modules in no layer: {unplaced}; place each in LAYERS of tests/test_architecture.py "
        "(and in the layer list of rubrax/__init__.py's docstring)")


def test_no_import_goes_up_a_layer(graph):
    upward = [
        f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {d} ({LAYER_NAMES[layer_of(d)]})"
        for m, deps in sorted(graph.items()) for d in sorted(deps)
        if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n  " + "\n  ".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path m0 -> ... -> m0), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_import_graph_has_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for(tmp_path):
    # The checks themselves, on made-up graphs: a cycle hidden in a function is found.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert layer_of("rubrax.theory.tilted") == LAYER_NAMES.index("leaves")
    assert layer_of("rubrax.theory.cli") == LAYER_NAMES.index("entry points")
    assert layer_of("rubrax.sim.world") == LAYER_NAMES.index("testbed")
    assert layer_of("rubrax.brand_new_module") is None
    # Imports inside functions and relative ones are read: p.sub.x imports p.y and p.sub.z.
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "sub/__init__.py", "sub/z.py"):
        (pkg / f).write_text("")
    (pkg / "sub" / "x.py").write_text("def f():\n    from ..y import g\n    from . import z\n")
    (pkg / "y.py").write_text("if True:\n    import p.sub.x\n    NAME = 'p.sub.z'\n")
    facts = static_facts(pkg)
    assert facts["imports"]["p.sub.x"] == ["p.sub.z", "p.y"] and facts["imports"]["p.y"] == ["p.sub.x"]
    assert facts["strings"]["p.y"] == ["p.sub.z"] and facts["imports"]["p"] == []


def test_package_docstring_gives_the_layers_in_order():
    doc = rubrax.__doc__
    positions = [doc.find(f"\n    {name}  ") for name in reversed(LAYER_NAMES)]  # a table, top first
    assert -1 not in positions, f"rubrax/__init__.py's docstring must name every layer {LAYER_NAMES}"
    assert positions == sorted(positions), f"rubrax/__init__.py's docstring must list the layers top first: {LAYER_NAMES[::-1]}"
    for letter in ("B ", "P ", "G ", "W ", "C ", "T = W + C", "S ", "V ", "D ", "L "):
        assert f"    {letter}" in doc, f"the shape glossary lacks {letter.strip()!r}"


def _naming(facts, prefix: str, below: str) -> list[str]:
    """Modules under layer `below` with a string (not a docstring) that contains `prefix`."""
    top = LAYER_NAMES.index(below)
    return sorted(m for m, strings in facts["strings"].items()
                  if layer_of(m) is not None and layer_of(m) < top and any(prefix in s for s in strings))


def test_the_core_never_names_the_testbed(facts):
    # Below the testbed, not even a string (a lazy registry entry, an importlib call) names
    # rubrax.sim; the reward registry names no module of the workflows (the toy task included).
    naming = _naming(facts, "rubrax.sim", "testbed")
    assert not naming, f"core modules naming rubrax.sim: {naming}"
    registry = [m for m in _naming(facts, "rubrax.rl", "workflows") if m.startswith("rubrax.rewards")]
    assert not registry, f"reward modules naming rubrax.rl: {registry}"


def test_rubric_types_are_a_leaf_without_rubrax_imports(graph):
    assert graph["rubrax.rubric"] == set()
    assert graph["rubrax.data.rubrics"] <= {"rubrax.rubric", "rubrax.data.records"}


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, check=True, timeout=120)
    return set(out.stdout.split())


def test_host_side_imports_pull_no_jax():
    seen = _modules_after(
        "import rubrax, rubrax.sim\n"
        "from rubrax.rewards import get_reward\n"
        "from rubrax.rubric import Criterion, Rubric\n"
        "r = get_reward('rubric', rubrics=[Rubric('p', 'q', (Criterion('c1', 'ok'),))], verifier=None)\n"
        "assert type(r).__name__ == 'RubricReward'\n"
        "get_reward('sim_gold', seed=0)\n"
    )
    assert "rubrax.rewards.rubric" in seen and "rubrax.sim.rewards" in seen  # the probe did resolve both
    assert not {m for m in seen if m == "jax" or m.startswith(("jax.", "flax", "orbax"))}
    assert "rubrax.rewards.bradley_terry" not in seen


if __name__ == "__main__":  # static_facts runs this file: python test_architecture.py PACKAGE_DIR
    print(json.dumps(read_sources(Path(sys.argv[1]))))
