"""compile(fn): torch.compile with the backend picked from where the tensors live.

Tensors on an Ascend NPU go to torchair's NPU graph backend (the one ModelLink/AscendSpeed
use); everything else to inductor. The choice is made on each call from the arguments'
devices, so one compiled function serves CPU tests and NPU runs.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.utils._pytree as torch_pytree

NPU_INSTALL_HINT = "pip install 'aquila-fn[npu]'"
BACKENDS = ("auto", "inductor", "npu", "torchair", "eager", "aot_eager")


def npu_backend(mode: str | None = None):
    """torchair's NPU backend; torch_npu must be imported before torchair. mode:
    "reduce-overhead" replays captured NPU graphs (aclgraph); default: torchair's own."""
    try:
        importlib.import_module("torch_npu")
        torchair = importlib.import_module("torchair")
    except ImportError as e:
        raise ImportError("compiling for an NPU needs torch_npu and torchair (shipped with "
                          f"torch_npu); install them with: {NPU_INSTALL_HINT}") from e
    config = torchair.CompilerConfig()
    if mode is not None:
        config.mode = mode
    return torchair.get_npu_backend(compiler_config=config)


def _on_npu(args, kwargs) -> bool:
    leaves = torch_pytree.tree_leaves((args, kwargs))
    return any(isinstance(x, torch.Tensor) and x.device.type == "npu" for x in leaves)


def _resolve(backend, args, kwargs):
    """The backend name (or callable) for this call; "auto" looks at the tensors."""
    if backend == "auto":
        return "npu" if _on_npu(args, kwargs) else "inductor"
    return backend


def compile(fn=None, *, backend="auto", fullgraph: bool = False, dynamic: bool | None = None,
            mode: str | None = None, options: dict | None = None):
    """torch.compile(fn) with backend "auto" (torchair on NPU tensors, else inductor),
    "inductor", "npu"/"torchair", "eager", "aot_eager", or any torch.compile backend callable.

    fullgraph=True makes a graph break an error. Usable as @compile or @compile(...).
    Returns a function with fn's signature; the compiled variant per backend is built on
    first use and kept.
    """
    if fn is None:
        return functools.partial(compile, backend=backend, fullgraph=fullgraph, dynamic=dynamic,
                                 mode=mode, options=options)
    if isinstance(backend, str) and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a callable, got {backend!r}")
    compiled: dict = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = _resolve(backend, args, kwargs)
        if key not in compiled:
            chosen = npu_backend() if key in ("npu", "torchair") else key
            # inductor-only knobs are meaningless (and rejected) for other backends
            extra = dict(mode=mode, options=options) if chosen == "inductor" else {}
            compiled[key] = torch.compile(fn, backend=chosen, fullgraph=fullgraph,
                                          dynamic=dynamic, **extra)
        return compiled[key](*args, **kwargs)

    wrapper.backend = backend
    wrapper.fullgraph = fullgraph
    return wrapper
