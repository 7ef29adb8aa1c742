"""The module paths of the flat layout (`aquila_fn.model`, `aquila_fn.generate`, ...) as aliases
of the modules' homes in the subpackages, so code written against them keeps importing. Lazy:
an alias imports its module only when asked for."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

HOMES = {
    "core": ("config", "model", "pytree", "transforms", "compile", "device", "files", "quantize"),
    "training": ("train", "optim", "checkpoint", "sharding", "pipeline_stages", "lora"),
    "jobs": ("pretrain", "finetune"),
    "data": ("tokenizer",),
    "inference": ("generate", "sampling", "decode_compile", "step_graph"),
    "evaluation": ("evaluate", "tasks", "lm_eval_adapter"),
    "interop": ("hf", "llama2c"),
}
MOVED = {f"aquila_fn.{name}": f"aquila_fn.{home}.{name}" for home, names in HOMES.items() for name in names}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])  # the module itself, under a second name

    def exec_module(self, module):
        pass  # already executed under its own name


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before path finders: the old files may linger
