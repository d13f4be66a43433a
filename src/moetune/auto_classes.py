"""Register moetune's model types with transformers' Auto classes without slowing ``import moetune``.

``AutoModelForCausalLM.from_pretrained(upcycled_dir)`` must work once moetune is imported. But the
architectures import torch and transformers' modeling code (seconds), which the CLI's quick verbs
(validate, print-config, --help) never need. So ``import moetune`` installs a small import hook
instead: it watches transformers' modules load, and registers as soon as the Auto classes exist and
the transformers import that brought them in has finished. Registering earlier, halfway through
that import, would import a partially initialised transformers module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# Loaded by AutoConfig and every AutoModel class; once it is, registration has something to register with.
AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
# Importing this module registers ``mpt_moe`` with AutoConfig and AutoModelForCausalLM.
ARCHITECTURES_MODULE = "moetune.models.families.mpt.modeling"


def register_with_transformers() -> None:
    """Register now if transformers' Auto classes are loaded, else as soon as they are."""
    if AUTO_CONFIG_MODULE in sys.modules:
        _import_architectures()
    elif not any(isinstance(finder, _RegisterAfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformersImport())


def _import_architectures() -> None:
    try:
        importlib.import_module(ARCHITECTURES_MODULE)
    except Exception as err:  # a broken registration must not break the user's transformers import
        warnings.warn(f"moetune could not register its model types with transformers ({err}); import "
                      f"{ARCHITECTURES_MODULE} before loading an upcycled (mpt_moe) checkpoint.", stacklevel=3)


class _RegisterAfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds transformers' modules as the default path finder would, counting the ones executing;
    when the outermost finishes with the Auto classes loaded, it registers and removes itself."""

    def __init__(self):
        self._executing = 0

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] != "transformers":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            self._executing += 1
            try:
                load(module)
            finally:
                self._executing -= 1
            if self._executing == 0 and AUTO_CONFIG_MODULE in sys.modules and self in sys.meta_path:
                sys.meta_path.remove(self)
                _import_architectures()

        spec.loader.exec_module = exec_module  # this loader instance serves this one module only
        return spec
