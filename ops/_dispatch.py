"""Choosing an implementation per call, the lazy torch_npu import and lazily compiled kernels."""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

IMPLS = ("auto", "reference", "fused", "npu")

NPU_INSTALL_HINT = "pip install 'aquila-fn[npu]'"

# Below this many elements an elementwise op is cheaper in eager mode than a compiled
# kernel's call overhead, and small (test-sized) models never pay compilation time.
MIN_FUSED_NUMEL = 1 << 15


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def is_npu(t: torch.Tensor) -> bool:
    return t.device.type == "npu"


def torch_npu():
    """Import torch_npu on demand; only the NPU paths need it."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:  # name the one command that fixes it
        raise ImportError(
            "an NPU implementation was requested but torch_npu is not installed; "
            f"install it with: {NPU_INSTALL_HINT}") from e


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _native_cpu_matmul_dtypes() -> frozenset:
    """Dtypes whose matmuls this CPU runs on its own instructions. Without avx512_bf16 / AMX
    (fp16: avx512_fp16 / AMX-FP16), torch's 16-bit CPU matmuls take emulated paths: on an
    AVX2-only Zen 3 a bf16 2048^3 matmul ran at 0.28 GFLOP/s against fp32's 123, and bf16
    SDPA forward+backward at 1024 tokens took 11.7 s against 0.7 s after casting to fp32."""
    native = {torch.float32, torch.float64}
    if torch.backends.mkldnn.is_available():
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            native.add(torch.bfloat16)
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            native.add(torch.float16)
    return frozenset(native)


# Read once (a constant for torch.compile); tests patch it to take either branch.
NATIVE_CPU_MATMUL_DTYPES = _native_cpu_matmul_dtypes()


def emulated_matmul(t: torch.Tensor) -> bool:
    """Whether matmuls in t's dtype on t's device would be emulated (16-bit on a CPU without
    the instructions): such ops compute in fp32 instead, which is both faster and closer to
    the reference."""
    return t.device.type == "cpu" and t.dtype not in NATIVE_CPU_MATMUL_DTYPES


def _plain(t: torch.Tensor) -> bool:
    # DTensor and other subclasses keep to eager reference math: no per-op compilation.
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    """A torch.distributed DTensor, recognised by its type: ops import nothing distributed
    unless one arrives. The one definition: `parallel` and `aquila_fn` use this too."""
    return isinstance(t, torch.Tensor) and type(t).__name__ == "DTensor"


def contiguous_strides(shape) -> tuple:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


def _broadcasts_over_splits(o, x) -> bool:
    """Whether `o` broadcasts (no dim, or size 1) along every dim that splits x."""
    lead = x.dim() - o.dim()
    return all(d - lead < 0 or o.shape[d - lead] == 1 for d in (p.dim for p in x.placements if p.is_shard()))


def _local_args(x, others):
    """The local blocks of (x, *others) for on_local_blocks, or None. An input placed like x
    contributes its block; a replicated one is whole on every rank and receives, from each
    rank, the gradient of that rank's block only: partial over the mesh dims that split x."""
    from torch.distributed.tensor import Partial, Replicate

    partial = tuple(Partial() if p.is_shard() else Replicate() for p in x.placements)
    args = [x.to_local()]
    for o in others:
        if not is_dtensor(o):
            if not _broadcasts_over_splits(o, x):
                return None
            args.append(o)  # a plain tensor: replicated (Layout.activate's implicit replication)
        elif o.device_mesh != x.device_mesh:
            return None
        elif o.placements == x.placements and o.dim() == x.dim():  # dims mean the same
            args.append(o.to_local())
        elif all(p.is_replicate() for p in o.placements) and _broadcasts_over_splits(o, x):
            args.append(o.to_local(grad_placements=partial))
        else:
            return None
    return args


def on_local_blocks(fn, x, *others, free_dims: tuple):
    """`fn(x, *others)` for a DTensor `x` computed on each rank's local blocks (torchtitan's
    local_map), or None where that would not equal the op on the whole tensors: x must be
    split only along `free_dims` (the dims the op treats each index of independently) or
    replicated, every other DTensor input placed like x or replicated, and plain inputs
    must fit x's local block. The result is placed like x, with x's shape."""
    if not is_dtensor(x) or not all(p.is_replicate() or (p.is_shard() and p.dim in free_dims)
                                    for p in x.placements):
        return None
    args = _local_args(x, others)
    if args is None:
        return None
    from torch.distributed.tensor import DTensor

    out = fn(*args).contiguous()
    return DTensor.from_local(out, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                              stride=contiguous_strides(x.shape))


def resolve_elementwise(impl: str, x: torch.Tensor) -> str:
    """auto for elementwise ops: npu on NPU; inside an outer torch.compile the reference
    (inductor fuses it with its neighbours); otherwise the compiled kernel for large tensors.
    Tensor subclasses (a DTensor the op could not run on block by block) take the reference,
    whatever impl says: the kernels take plain tensors."""
    check_impl(impl)
    if not _plain(x):
        return "reference"
    if impl != "auto":
        return impl
    if is_npu(x):
        return "npu"
    if is_compiling() or x.numel() < MIN_FUSED_NUMEL:
        return "reference"
    return "fused"


class LazyCompiled:
    """torch.compile(fn) built on first use; if compilation fails (no C++ compiler, an
    unsupported platform) it warns once and runs fn eagerly from then on. On meta tensors
    (shape-only dry runs), which have no code to run, fn runs eagerly."""

    def __init__(self, fn, **compile_kwargs):
        self.fn = fn
        self.compile_kwargs = compile_kwargs
        self.compiled = None
        self.broken = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if self.broken or is_compiling() or any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            return self.fn(*args, **kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, **self.compile_kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            out = self.fn(*args, **kwargs)  # a genuine user error raises again here
            self.broken = True  # eager works, so the backend is what failed: stop using it
            warnings.warn(f"ops: compiling {self.fn.__name__} failed ({type(e).__name__}: {e}); "
                          "using the eager reference", RuntimeWarning, stacklevel=2)
            return out
