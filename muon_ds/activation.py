"""Patch DeepSpeed as soon as it is imported, without importing it ourselves.

``import muon_ds`` calls :func:`activate_deepspeed_on_import`; so does the ``muon_ds_autoload.pth``
file the wheel installs, at interpreter start-up, unless ``MUON_DS_AUTOLOAD=0``: existing scripts
then get muon_ds's ``"type": "Muon"`` with no edit at all.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Optional, Sequence


def _register(module: ModuleType) -> None:
    from muon_ds.deepspeed.registration import register

    register()


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``deepspeed`` through the other finders and runs the registration after it executes.

    It stays on ``sys.meta_path`` until DeepSpeed has really been imported: libraries probe with
    ``importlib.util.find_spec("deepspeed")`` first (transformers does), which must not use it up.
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "deepspeed":
            return None
        for finder in sys.meta_path:
            spec = (finder.find_spec(fullname, path, target)
                    if finder is not self and hasattr(finder, "find_spec") else None)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run_module = spec.loader.exec_module

                def exec_then_register(module: ModuleType) -> None:
                    run_module(module)
                    if self in sys.meta_path:
                        sys.meta_path.remove(self)
                    _register(module)

                spec.loader.exec_module = exec_then_register
                return spec
        return None


def activate_deepspeed_on_import() -> None:
    """Register muon_ds with DeepSpeed now if it is loaded, else when it gets imported."""
    if "deepspeed" in sys.modules:
        _register(sys.modules["deepspeed"])
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
