"""The registries in moetune.plugins name the modules that really implement each name, and loading a
config through them stays light. (That no stage imports a later one is tests/test_layers.py's.)"""

from __future__ import annotations

import dataclasses
import pkgutil
import subprocess
import sys
from pathlib import Path

import moetune.models.families as families_package
from moetune import plugins
from moetune.data.sources import SourceKind, registered_kinds


def test_the_family_table_lists_every_family_module():
    modules = sorted(m.name for m in pkgutil.iter_modules(families_package.__path__) if not m.name.startswith("_"))
    assert sorted(plugins.FAMILY_MODULES) == modules == list(plugins.FAMILY_NAMES)
    assert plugins.FAMILY_MODULES == {name: f"moetune.models.families.{name}" for name in modules}


def test_every_registered_source_module_exports_its_kind():
    kinds = registered_kinds()
    assert [kind.name for kind in kinds] == list(plugins.SOURCE_MODULES) == ["rust_repo", "qa_jsonl", "chat", "instruction", "text", "preference"]
    for kind in kinds:
        assert isinstance(kind, SourceKind)
        fields = {f.name: f for f in dataclasses.fields(kind.config_class)}
        assert fields["type"].default == kind.name and "path" in fields
        assert kind.config_class.__dataclass_params__.frozen


def test_validate_imports_no_heavy_library(tmp_path: Path):
    (tmp_path / "crate").mkdir()
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    (tmp_path / "config.yaml").write_text("data:\n  chat_template: chatml\n  sources:\n    - {type: rust_repo, path: crate}\n"
                                          "    - {type: qa_jsonl, path: qa.jsonl}\n    - {type: chat, path: chats.jsonl}\n")
    script = ("import sys\nfrom moetune.cli import main\ncode = main(['validate', '--config', 'config.yaml'])\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'tree_sitter', "
              "'tree_sitter_rust', 'pathspec', 're2'}))\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    valid, checked, heavy = done.stdout.splitlines()
    assert valid == "config.yaml: valid (3 data source(s), output_dir outputs/run)"
    # The default model is a hub id: its config is not read, and the line says the model was not checked.
    assert checked.startswith("config only: model.name 'mistralai/Mixtral-8x7B-v0.1' is not a local folder")
    assert heavy == "[]"
