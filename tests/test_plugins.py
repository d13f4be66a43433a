"""The registries in moetune.plugins name the modules that really implement each name, and the layers
stay in order: plugins imports nothing of moetune, the config layer nothing of a later stage."""

from __future__ import annotations

import ast
import dataclasses
import pkgutil
import subprocess
import sys
from pathlib import Path

import moetune
import moetune.models.families as families_package
from moetune import plugins
from moetune.data.sources import SourceKind, registered_kinds

PACKAGE = Path(moetune.__file__).parent
LATER_STAGES = ("moetune.data", "moetune.models", "moetune.train", "moetune.eval")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the moetune module at ``path``: see :func:`imports_in`."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` (a module of ``package``), at any depth (inside
    functions too), relative ones resolved, plus ``importlib.import_module("...")`` calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _reaches(module: str, targets: tuple[str, ...]) -> bool:
    return any(module == t or module.startswith(t + ".") for t in targets)


def test_the_import_scan_sees_function_level_and_relative_imports():
    # The check below can only fail if the scan finds imports hidden in functions or written relatively.
    assert (9, "moetune.config.schema") in imported_modules(PACKAGE / "config" / "reference.py")
    hidden = ("import yaml\n\ndef f():\n    from ..data import build\n    from . import schema\n"
              "    import importlib\n    importlib.import_module('moetune.eval.report')\n")
    modules = [m for _, m in imports_in(hidden, "moetune.config")]
    assert "moetune.config.schema" in modules and "yaml" in modules
    assert [m for m in modules if _reaches(m, LATER_STAGES)] == ["moetune.data", "moetune.data.build",
                                                                 "moetune.eval.report"]


def test_the_config_layer_imports_no_later_stage():
    upward = [f"{path.relative_to(PACKAGE)}:{line}: {module}"
              for path in sorted((PACKAGE / "config").rglob("*.py"))
              for line, module in imported_modules(path) if _reaches(module, LATER_STAGES)]
    assert upward == []


def test_plugins_imports_nothing_of_moetune():
    assert [m for _, m in imported_modules(PACKAGE / "plugins.py") if _reaches(m, ("moetune",))] == []


def test_the_family_table_lists_every_family_module():
    modules = sorted(m.name for m in pkgutil.iter_modules(families_package.__path__) if not m.name.startswith("_"))
    assert sorted(plugins.FAMILY_MODULES) == modules == list(plugins.FAMILY_NAMES)
    assert plugins.FAMILY_MODULES == {name: f"moetune.models.families.{name}" for name in modules}


def test_every_registered_source_module_exports_its_kind():
    kinds = registered_kinds()
    assert [kind.name for kind in kinds] == list(plugins.SOURCE_MODULES) == ["rust_repo", "qa_jsonl"]
    for kind in kinds:
        assert isinstance(kind, SourceKind)
        fields = {f.name: f for f in dataclasses.fields(kind.config_class)}
        assert fields["type"].default == kind.name and "path" in fields
        assert kind.config_class.__dataclass_params__.frozen


def test_validate_imports_no_heavy_library(tmp_path: Path):
    (tmp_path / "crate").mkdir()
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "config.yaml").write_text("data:\n  sources:\n    - {type: rust_repo, path: crate}\n"
                                          "    - {type: qa_jsonl, path: qa.jsonl}\n")
    script = ("import sys\nfrom moetune.cli import main\ncode = main(['validate', '--config', 'config.yaml'])\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'tree_sitter', "
              "'tree_sitter_rust', 'pathspec', 're2'}))\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["config.yaml: valid (2 data source(s), output_dir outputs/run)", "[]"]
