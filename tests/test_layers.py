"""Imports point down the path config -> data -> models -> plan -> train -> eval, and no two modules of a stage
import each other, directly or around a circle.

Every import in a stage's modules is read from the source, those inside functions and under
TYPE_CHECKING included: a module imports only its own stage, an earlier one, or a neutral module.
"""

import ast
import sys
from pathlib import Path

import pytest

from moetune import plugins

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moetune"
STAGES = ("config", "data", "models", "plan", "train", "eval")
NEUTRAL = {"errors", "run_dir", "plugins", "auto_classes"}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in ``source``, the file of the dotted ``module``."""
    package = module.split(".")[:-1]  # what a relative import starts from (a package's __init__ too)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from moetune import train` imports the module moetune.train.
            found += [(node.lineno, f"{base}.{alias.name}" if base == "moetune" else base) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def stage_of(module: str) -> int | None:
    """Position of a moetune module's stage on the path; None for neutral and non-moetune modules,
    len(STAGES) for the top-level ones (cli, sweep, ...), which only the command line may import."""
    parts = module.split(".")
    if parts[0] != "moetune" or len(parts) == 1 or parts[1] in NEUTRAL:
        return None
    return STAGES.index(parts[1]) if parts[1] in STAGES else len(STAGES)


def imports_of(stage: str, refused) -> list[str]:
    """``file:line imports module`` for every import in ``stage``'s modules for which ``refused(module)``."""
    problems = []
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        module = ".".join(("moetune", *path.relative_to(PACKAGE).with_suffix("").parts))
        problems += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
                     for line, name in imported_modules(path.read_text(), module) if refused(name)]
    return problems


def upward_imports(stage: str) -> list[str]:
    """The imports in ``stage`` of a later stage or a top-level module."""
    own = STAGES.index(stage)
    return imports_of(stage, lambda name: stage_of(name) is not None and stage_of(name) > own)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_its_own_or_earlier_stages(stage):
    assert (PACKAGE / stage).is_dir()
    assert upward_imports(stage) == []


def test_eval_reads_a_run_through_the_run_folder_and_models_not_train():
    # A run folder's layout is moetune.run_dir's and its weight files are moetune.models', so evaluating
    # a run needs nothing of the code that trained it.
    assert imports_of("eval", lambda name: name == "moetune.train" or name.startswith("moetune.train.")) == []


def test_the_registries_import_nothing_of_moetune():
    # Every stage reads the names in moetune.plugins; the modules they name are imported only when used.
    names = [name for _, name in imported_modules((PACKAGE / "plugins.py").read_text(), "moetune.plugins")]
    assert [name for name in names if name.split(".")[0] == "moetune"] == []


def test_the_run_folder_layout_imports_no_stage():
    names = {name for _, name in imported_modules((PACKAGE / "run_dir.py").read_text(), "moetune.run_dir")}
    assert names and all(name == "moetune.errors" or name.split(".")[0] in sys.stdlib_module_names for name in names)


def import_graph() -> dict[str, set[str]]:
    """moetune module -> the moetune modules it imports (``from a import b`` counts as a.b when b is a module)."""
    modules = {".".join(("moetune", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
               for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        names = set()
        tree_module = module + ".__init__" if path.name == "__init__.py" else module
        for _, name in imported_modules(path.read_text(), tree_module):
            names.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moetune"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {name for name in names if name in modules and name != module}
    # The registries import what moetune.plugins names, by a path read from a table.
    graph["moetune.models.families"] |= set(plugins.FAMILY_MODULES.values())
    graph["moetune.data.sources"] |= set(plugins.SOURCE_MODULES.values())
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


@pytest.mark.parametrize("stage", STAGES)
def test_no_two_modules_of_a_stage_import_each_other(stage):
    graph = import_graph()
    inside = {module: {t for t in targets if t.startswith(f"moetune.{stage}.")}
              for module, targets in graph.items() if module.startswith(f"moetune.{stage}.")}
    assert inside
    assert import_cycles(inside) == []


def test_the_cycle_finder_finds_a_circle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_reader_sees_every_form_of_import():
    source = """
import moetune.eval.report
from moetune.train.loop import train
from moetune import sweep
from ..eval import load
from . import losses
def later():
    from moetune.train import checkpoint
    importlib.import_module("moetune.eval.compare_models")
"""
    names = [name for _, name in imported_modules(source, "moetune.models.layout")]
    assert sorted(names) == sorted(["moetune.eval.report", "moetune.train.loop", "moetune.sweep", "moetune.eval",
                                    "moetune.models", "moetune.train", "moetune.eval.compare_models"])
    later = {name for name in names if stage_of(name) is not None and stage_of(name) > STAGES.index("models")}
    assert later == {"moetune.eval.report", "moetune.train.loop", "moetune.sweep", "moetune.eval", "moetune.train",
                     "moetune.eval.compare_models"}
    assert stage_of("moetune.errors") is None and stage_of("moetune.run_dir") is None and stage_of("torch") is None
