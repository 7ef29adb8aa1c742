"""The decode step compiled ahead of time into a package kept on disk, so that a later run
decodes at once: its key, its export and build, and loading it back.

`steps.decode_step` is exported (torch.export: the KV cache is an input the step mutates in
place, its length a dynamic dimension in multiples of CACHE_BUCKET) and compiled by AOTInductor
into a package: a shared library with its kernels, which a later run loads in milliseconds. A
step compiled with torch.compile is re-traced by dynamo at every start, and with the custom
decompositions of `steps.decode_backend` inductor's FX graph cache is bypassed and
AOTAutograd's cache misses as well: a second start of the `small` model took 64 s of the
first one's 105 s on the development machine.

A package's file name is a digest of everything that shapes its code: the model config, the
parameters' paths, shapes and dtypes (int8, merged projections, a tied head), the compute
dtype, the batch size, the device (the CPU's model and instruction set; the GPU's model and CUDA
version), torch's version and the source of the traced modules. Weights are inputs, not
constants: every checkpoint of one shape shares a package; CPU loops take their thread count at
run time, so one package serves any --threads.

Packages live in ~/.cache/aquila_fn/compiled ($AQUILA_FN_COMPILE_CACHE or `directory=`
overrides it), written atomically. Building them under a lock, in the foreground or in a
background process, is aquila_fn.inference.aot_build; when to use them, decode_compile.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as torch_pytree

from aquila_fn.core import pytree
from aquila_fn.core.config import ModelConfig
from aquila_fn.inference.steps import decode_decompositions, decode_step

CACHE_BUCKET = 64  # cache lengths are multiples of this: the package's one dynamic dimension
CACHE_ENV = "AQUILA_FN_COMPILE_CACHE"
AOT_DEVICES = ("cpu", "cuda")


def cache_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where packages are kept: `directory`, else $AQUILA_FN_COMPILE_CACHE, else
    $XDG_CACHE_HOME (~/.cache) /aquila_fn/compiled."""
    if directory is None:
        directory = os.environ.get(CACHE_ENV) or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aquila_fn" / "compiled"
    return Path(directory).expanduser()


def canonical(params):
    """The same tensors re-nested with every dict in sorted key order: torch's pytree flattens
    dicts in insertion order, so a package and its caller must agree on one order."""
    return pytree.unflatten_dict(pytree.flatten_dict(params))


# ----------------------------------------------------------------------------- the package key


@dataclass(frozen=True)
class StepSpec:
    """What a package is compiled for (weights aside)."""

    config: ModelConfig
    leaves: tuple  # ((path, shape, dtype name), ...) of the parameters
    compute_dtype: str
    batch: int
    device: str
    impl: str

    @classmethod
    def of(cls, params, config: ModelConfig, *, compute_dtype: torch.dtype, batch: int,
           device: torch.device, impl: str) -> "StepSpec":
        leaves = tuple((path, tuple(x.shape), str(x.dtype).removeprefix("torch."))
                       for path, x in pytree.named_leaves(params))
        return cls(config, leaves, str(compute_dtype).removeprefix("torch."), batch,
                   str(torch.device(device)), impl)

    def to_json(self) -> dict:
        return {"config": self.config.to_dict(), "leaves": [list(x) for x in self.leaves],
                "compute_dtype": self.compute_dtype, "batch": self.batch, "device": self.device,
                "impl": self.impl}

    @classmethod
    def from_json(cls, d: dict) -> "StepSpec":
        leaves = tuple((p, tuple(shape), dtype) for p, shape, dtype in d["leaves"])
        return cls(ModelConfig.from_dict(d["config"]), leaves, d["compute_dtype"], d["batch"],
                   d["device"], d["impl"])

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def digest(self) -> str:
        described = {**self.to_json(), "device": _device_fingerprint(torch.device(self.device)),
                     "torch": torch.__version__, "source": _source_digest()}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]

    def package_path(self, directory: Path) -> Path:
        return directory / f"decode-{self.digest()}.pt2"


def _device_fingerprint(device: torch.device) -> str:
    """What the generated code depends on besides torch: the CPU (inductor compiles for the
    host's instruction set: model name and feature flags), or the GPU's model, capability and
    CUDA version."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{cap[0]}{cap[1]}:{torch.version.cuda}"
    if device.type == "cpu":
        return f"cpu:{platform.machine()}:{_cpuinfo_digest()}"
    return device.type


@functools.lru_cache(maxsize=None)
def _cpuinfo_digest() -> str:
    """The first processor's model name and flags (reading them costs microseconds; asking
    inductor which vector ISA it would pick imports it and compiles probes: seconds)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().split("\n\n")[0].splitlines()
                     if line.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    """The traced code: the model, its ops, the decode step with its decompositions (steps) and
    its export (this module)."""
    import ops
    import parallel
    from aquila_fn.core import config, model
    from aquila_fn.inference import steps
    files = [inspect.getsourcefile(m) for m in (config, steps, model, sys.modules[__name__])]
    files += sorted(str(p) for p in Path(inspect.getsourcefile(ops)).parent.glob("*.py"))
    files.append(inspect.getsourcefile(inspect.getmodule(parallel.constrain)))
    h = hashlib.sha256()
    for name in files:
        h.update(Path(name).read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- export and build


class _DecodeStep(torch.nn.Module):
    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, impl: str):
        super().__init__()
        self.config, self.compute_dtype, self.impl = config, compute_dtype, impl

    def forward(self, params, tokens, cache, start_pos, positions, key_mask):
        logits, _ = decode_step(params, tokens, cache, start_pos, positions, key_mask,
                                config=self.config, compute_dtype=self.compute_dtype, impl=self.impl)
        return logits


def example_inputs(params, config: ModelConfig, spec: StepSpec, length: int):
    from aquila_fn.core.model import init_cache
    device, b = torch.device(spec.device), spec.batch
    cache = init_cache(config, b, length, dtype=getattr(torch, spec.compute_dtype), device=device)
    zeros = torch.zeros(b, 1, dtype=torch.long, device=device)
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    return (canonical(params), zeros, cache, torch.tensor(0, device=device), zeros.clone(), mask)


def export_step(params, spec: StepSpec) -> torch.export.ExportedProgram:
    """The decode step as an ExportedProgram over any cache length that is a multiple of
    CACHE_BUCKET, decomposed for inductor."""
    config = spec.config
    blocks = -(-config.max_seq_len // CACHE_BUCKET)
    args = example_inputs(params, config, spec, CACHE_BUCKET * min(2, blocks))
    dynamic = None
    if blocks >= 2:
        length = CACHE_BUCKET * torch.export.Dim("cache_blocks", min=1, max=blocks)
        per_layer = [{"k": {1: length}, "v": {1: length}} for _ in range(config.n_layers)]
        dynamic = (torch_pytree.tree_map(lambda _: None, args[0]), None, per_layer, None, None, {1: length})
    module = _DecodeStep(config, getattr(torch, spec.compute_dtype), spec.impl)
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        return ep.run_decompositions(decode_decompositions())


def build_package(params, spec: StepSpec, directory: Path) -> float:
    """Export, compile and write the package (atomically); the seconds it took."""
    t0 = time.perf_counter()
    path = spec.package_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        ep = export_step(params, spec)
        # CPU loops read the thread count at run time: measured as fast as loops compiled for
        # one thread, and one package serves any --threads.
        options = {"cpp.dynamic_threads": True} if spec.device_type == "cpu" else {}
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=options)
        os.replace(tmp, path)
    except Exception as e:
        write_atomic(failed_path(path), first_line(e))  # auto stops retrying it at every run
        raise
    finally:
        tmp.unlink(missing_ok=True)
    failed_path(path).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    info = {"build_s": round(seconds, 1), "n_layers": spec.config.n_layers, "device": spec.device_type,
            "batch": spec.batch, "torch": torch.__version__, "dim": spec.config.dim}
    write_atomic(path.with_suffix(".json"), json.dumps(info))
    return seconds


def failed_path(package: Path) -> Path:
    """The marker a failed build leaves (its error's first line), so `auto` does not retry it at every run."""
    return package.with_suffix(".failed")


def first_line(error: BaseException) -> str:
    """The error's type and first line, for a one-line log or marker."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def write_atomic(path: Path, text: str) -> None:
    """Through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loading


class AotStep:
    """A loaded package as the decode step: (params, tokens, cache, start_pos, positions,
    key_mask) -> logits [B, V], the cache written in place. The parameter leaves are flattened
    once; each call hands the runner a flat list (the package's Python wrapper re-parses its
    input spec at every call)."""

    def __init__(self, loader, params, path: Path):
        self.path = path
        self._run = loader.boxed_run
        self._in_spec = torch_pytree.treespec_loads(loader.get_call_spec()[0])
        self._params = params
        self._param_leaves = torch_pytree.tree_leaves(params)
        self._checked = False

    def __call__(self, params, tokens, cache, start_pos, positions, key_mask):
        if params is not self._params:
            raise ValueError("an AotStep runs with the parameters it was loaded for")
        if not self._checked:
            _, spec = torch_pytree.tree_flatten(((params, tokens, cache, start_pos, positions, key_mask), {}))
            if spec != self._in_spec:
                raise ValueError(f"inputs do not match the compiled decode step {self.path}")
            self._checked = True
        flat = [*self._param_leaves, tokens]
        for layer in cache:
            flat += (layer["k"], layer["v"])
        flat += (start_pos, positions, key_mask)
        return self._run(flat)[0]


def load_step(path: Path, params, device: torch.device, *, single_threaded: bool = False) -> AotStep:
    """`params` must be `canonical`. single_threaded: no runner locks (needed under CUDA graph
    capture). The C++ loader directly: torch._inductor.aoti_load_package would first import
    inductor and dynamo, seconds of a start that otherwise takes milliseconds."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", single_threaded, 1, index)
    return AotStep(loader, params, path)
