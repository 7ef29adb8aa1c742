"""The decode step compiled ahead of time and kept on disk, so that a later run decodes at once.

`generate.decode_step` is exported (torch.export: the KV cache is an input the step mutates in
place, its length a dynamic dimension in multiples of CACHE_BUCKET) and compiled by AOTInductor
into a package: a shared library with its kernels, which a later run loads in milliseconds. A
step compiled with torch.compile is re-traced by dynamo at every start, and with the custom
decompositions of `generate.decode_backend` inductor's FX graph cache is bypassed and
AOTAutograd's cache misses as well: a second start of the `small` model took 64 s of the
first one's 105 s on the development machine.

A package's file name is a digest of everything that shapes its code: the model config, the
parameters' paths, shapes and dtypes (int8, merged projections, a tied head), the compute
dtype, the batch size, the device (the CPU's model and instruction set; the GPU's model and CUDA
version), torch's version and the source of the traced modules. Weights are inputs, not
constants: every checkpoint of one shape shares a package; CPU loops take their thread count at
run time, so one package serves any --threads.

Packages live in ~/.cache/aquila_fn/compiled ($AQUILA_FN_COMPILE_CACHE or `directory=`
overrides it), written atomically; a build in progress holds a lock file naming its pid.
`python -m aquila_fn.inference.decode_compile SPEC.json` is the background build that `--compile auto`
starts when a run is too short to repay compiling in the foreground.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.utils._pytree as torch_pytree

from aquila_fn.core import pytree
from aquila_fn.core.config import ModelConfig

CACHE_BUCKET = 64  # cache lengths are multiples of this: the package's one dynamic dimension
CACHE_ENV = "AQUILA_FN_COMPILE_CACHE"
BACKGROUND_ENV = "AQUILA_FN_COMPILE_BACKGROUND"  # "0": never start background builds
AOT_DEVICES = ("cpu", "cuda")

# Rough per-device figures for the `auto` estimate (a factor of two either way does not change
# a decision that matters: it is far off only for runs near the break-even length).
BANDWIDTH = {"cpu": 20e9, "cuda": 2e12, "npu": 1.5e12}  # bytes/s a compiled step reads weights at
EAGER_SLOWDOWN = {"cpu": 3.0, "cuda": 1.0, "npu": 1.0}  # eager CPU matvecs (MKL gemv) read at ~1/3
# Per eager op (~25 per layer), Python and dispatch included, measured: stories260K decodes at
# ~5 ms/token eagerly on one Zen 3 thread (5 layers: 40 us/op), 7B bf16 on an H200 at 29.5 ms
# (32 layers: 28 us/op beside the 7 ms weight read).
LAUNCH_S = {"cpu": 40e-6, "cuda": 30e-6, "npu": 40e-6}
OPS_PER_LAYER = 25
DEFAULT_BUILD_S = {"cpu": (20.0, 6.0), "cuda": (30.0, 2.0), "npu": (60.0, 3.0)}  # s + s/layer
LOCK_MAX_AGE_S = 3 * 3600
MIN_BACKGROUND_SAVING_S = 1.0  # a background build only for runs that it would speed up this much


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
    """The traced code: the model, its ops, the decode step and this module."""
    import ops
    import parallel
    from aquila_fn.core import config, model
    from aquila_fn.inference import generate
    files = [inspect.getsourcefile(m) for m in (config, generate, model, sys.modules[__name__])]
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
        from aquila_fn.inference.generate import decode_step
        logits, _ = decode_step(params, tokens, cache, start_pos, positions, key_mask,
                                config=self.config, compute_dtype=self.compute_dtype, impl=self.impl)
        return logits


def decode_decompositions() -> dict:
    """Core ATen, with batch-1 matrix products as fused reductions (see generate.decode_backend)."""
    from aquila_fn.inference.generate import _batched_matvec_as_reduction, _matvec_as_reduction
    table = torch.export.default_decompositions()
    table[torch.ops.aten.mm.default] = _matvec_as_reduction
    table[torch.ops.aten.bmm.default] = _batched_matvec_as_reduction
    return table


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
        _write_atomic(_failed_path(path), _first_line(e))  # auto stops retrying it at every run
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _failed_path(path).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    info = {"build_s": round(seconds, 1), "n_layers": spec.config.n_layers, "device": spec.device_type,
            "batch": spec.batch, "torch": torch.__version__, "dim": spec.config.dim}
    _write_atomic(path.with_suffix(".json"), json.dumps(info))
    return seconds


def _failed_path(package: Path) -> Path:
    return package.with_suffix(".failed")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _write_atomic(path: Path, text: str) -> None:
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


# ----------------------------------------------------------------------------- locks


def _lock_path(package: Path) -> Path:
    return package.with_suffix(".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def build_in_progress(package: Path) -> int | None:
    """The pid building this package, if a live one holds its lock. A lock whose process is gone,
    or older than LOCK_MAX_AGE_S (its pid may have been reused), is stale and removed."""
    lock = _lock_path(package)
    try:
        pid = int(lock.read_text().strip() or 0)
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return None
    if pid and _alive(pid) and age < LOCK_MAX_AGE_S:
        return pid
    lock.unlink(missing_ok=True)
    return None


def _take_lock(package: Path, pid: int) -> bool:
    package.parent.mkdir(parents=True, exist_ok=True)
    build_in_progress(package)  # clears a stale lock
    try:
        fd = os.open(_lock_path(package), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(pid))
    return True


def _release_lock(package: Path) -> None:
    _lock_path(package).unlink(missing_ok=True)


def wait_for_build(package: Path, poll_s: float = 0.5) -> None:
    while build_in_progress(package) is not None:
        time.sleep(poll_s)


def build_locked(params, spec: StepSpec, directory: Path) -> float | None:
    """Build under the lock; None when another process built it meanwhile (waited for)."""
    package = spec.package_path(directory)
    while not package.exists():
        if _take_lock(package, os.getpid()):
            try:
                return build_package(params, spec, directory)
            finally:
                _release_lock(package)
        wait_for_build(package)
    return None


# ----------------------------------------------------------------------------- background builds


def background_builds_enabled() -> bool:
    return os.environ.get(BACKGROUND_ENV, "1") != "0"


def start_background_build(spec: StepSpec, directory: Path) -> int | None:
    """Build the package in a detached, low-priority process that outlives this one; its pid,
    or None when a build already holds the lock. Its output goes to <package>.log."""
    package = spec.package_path(directory)
    if not _take_lock(package, os.getpid()):
        return None
    try:
        spec_file = package.with_suffix(".spec.json")
        _write_atomic(spec_file, json.dumps({"spec": spec.to_json(), "directory": str(directory),
                                             "package": str(package)}))
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with open(package.with_suffix(".log"), "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "aquila_fn.inference.decode_compile", str(spec_file)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        _write_atomic(_lock_path(package), str(proc.pid))
        return proc.pid
    except BaseException:
        _release_lock(package)
        raise


def _placeholder_params(spec: StepSpec):
    """Uninitialised tensors of the parameters' shapes: a build reads no weight values."""
    device = torch.device(spec.device)
    return pytree.unflatten_dict({path: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                                  for path, shape, dtype in spec.leaves})


def main(argv: list[str] | None = None) -> int:
    """The background build: `python -m aquila_fn.inference.decode_compile SPEC.json`."""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    spec, directory, package = StepSpec.from_json(job["spec"]), Path(job["directory"]), Path(job["package"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still release the lock
    try:
        os.nice(10)  # yield the CPU to whoever is decoding meanwhile
    except OSError:
        pass
    try:
        if spec.package_path(directory) != package:
            print(f"error: {package} does not match this process's build of its spec", file=sys.stderr)
            return 1
        seconds = build_package(_placeholder_params(spec), spec, directory)
        print(f"built {package} in {seconds:.1f} s", flush=True)
        return 0
    finally:
        _release_lock(package)
        Path(argv[0]).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the auto policy


def estimated_build_s(spec: StepSpec, directory: Path) -> float:
    """From the last build recorded here on this kind of device (scaled by layers), else a default."""
    kind, layers = spec.device_type, spec.config.n_layers
    records = []
    for meta in directory.glob("decode-*.json"):
        try:
            info = json.loads(meta.read_text())
            if info.get("device") == kind:
                records.append((meta.stat().st_mtime, info))
        except (OSError, ValueError):
            continue
    if records:
        info = max(records, key=lambda r: r[0])[1]
        return info["build_s"] * default_build_s(kind, layers) / default_build_s(kind, info["n_layers"])
    return default_build_s(kind, layers)


def estimated_saving_s(params, config: ModelConfig, device: torch.device, steps: int) -> float:
    """Seconds a compiled step saves over `steps` eager ones: the eager step reads the weights
    slower on CPU and pays a launch per op (the compiled one fuses each layer into a few kernels)."""
    from aquila_fn.core.quantize import weight_bytes
    kind = device.type
    compiled = weight_bytes(params) / BANDWIDTH.get(kind, BANDWIDTH["cpu"])
    eager = EAGER_SLOWDOWN.get(kind, 1.0) * compiled + config.n_layers * OPS_PER_LAYER * LAUNCH_S.get(kind, 1e-5)
    return steps * max(eager - compiled, 0.0)


def repays(saving: float, build_s: float, steps: int) -> tuple[bool, str]:
    """Whether compiling (build_s seconds) repays itself within this run, and the reason in words."""
    if saving > build_s:
        return True, f"{steps} decode steps save ~{saving:.0f} s, more than compiling takes (~{build_s:.0f} s)"
    return False, f"{steps} decode steps would save ~{saving:.1f} s, compiling takes ~{build_s:.0f} s"


def default_build_s(device_type: str, n_layers: int) -> float:
    base, per_layer = DEFAULT_BUILD_S.get(device_type, DEFAULT_BUILD_S["cpu"])
    return base + per_layer * n_layers


@dataclass
class Decision:
    compile: bool
    reason: str
    build: str = "none"  # "load" | "foreground" | "background" | "none"


def decide(mode: str, spec: StepSpec, params, steps: int, directory: Path) -> Decision:
    """Whether this run decodes with the compiled step, and how it gets it. mode "on": load or
    build now; "auto": load if cached, build now if the run repays it, else decode eagerly and
    (where enabled) build it in the background for later runs."""
    package = spec.package_path(directory)
    if mode == "on":
        how = "load" if package.exists() else "foreground"
        return Decision(True, "--compile on", how)
    if package.exists():
        return Decision(True, f"compiled step cached in {directory}", "load")
    if _failed_path(package).exists():
        return Decision(False, f"its last build failed ({_failed_path(package).read_text()}; log "
                               f"{package.with_suffix('.log')}); --compile on tries again")
    saving = estimated_saving_s(params, spec.config, torch.device(spec.device), steps)
    pays, reason = repays(saving, estimated_build_s(spec, directory), steps)
    if pays:
        return Decision(True, reason, "foreground")
    pid = build_in_progress(package)
    if pid is not None:
        return Decision(False, f"{reason}; a background build (pid {pid}) will serve later runs")
    if background_builds_enabled() and saving >= MIN_BACKGROUND_SAVING_S:
        return Decision(False, f"{reason}; building it in the background for later runs", "background")
    return Decision(False, reason)


class CompiledSteps:
    """The compiled decode steps of one Decoder, one per batch size, chosen by `decide`.
    `log` receives one line per decision and per load or build."""

    def __init__(self, params, config: ModelConfig, *, mode: str, compute_dtype: torch.dtype,
                 device: torch.device, impl: str, directory=None, log: Callable[[str], None] | None = None,
                 single_threaded: bool = False):
        self.params, self.config, self.mode = canonical(params), config, mode
        self.compute_dtype, self.device, self.impl = compute_dtype, torch.device(device), impl
        self.directory = cache_dir(directory)
        self.log = log or (lambda line: None)
        self.single_threaded = single_threaded
        self.steps: dict[int, AotStep] = {}
        self._said: dict[int, str] = {}
        self.warmup_s = 0.0  # seconds spent loading or building, all calls

    def spec(self, batch: int) -> StepSpec:
        return StepSpec.of(self.params, self.config, compute_dtype=self.compute_dtype, batch=batch,
                           device=self.device, impl=self.impl)

    def get(self, batch: int, steps: int) -> AotStep | None:
        """The compiled step for this batch size, or None to decode eagerly this time. Under
        "auto" a failed build or load falls back to eager decoding; under "on" it raises."""
        if batch in self.steps:
            return self.steps[batch]
        spec = self.spec(batch)
        decision = decide(self.mode, spec, self.params, steps, self.directory)
        self._say(batch, f"compile: {'on' if decision.compile else 'off'} ({decision.reason})")
        if decision.build == "background":
            try:
                pid = start_background_build(spec, self.directory)
            except OSError as e:  # an unwritable cache directory: decode eagerly all the same
                self.log(f"compile: no background build ({_first_line(e)})")
                pid = None
            if pid is not None:
                self.log(f"compile: background build pid {pid}, log {spec.package_path(self.directory).with_suffix('.log')}")
        if not decision.compile:
            return None
        t0 = time.perf_counter()
        try:
            self.steps[batch] = self._build_and_load(spec, decision)
        except Exception as e:  # noqa: BLE001 - any failure to compile means: decode eagerly
            if self.mode == "on":
                raise
            self._said[batch] = "compile: off"
            self.log(f"compile: off (the compiled step failed: {_first_line(e)})")
            return None
        self.warmup_s += time.perf_counter() - t0
        return self.steps[batch]

    def _build_and_load(self, spec: StepSpec, decision: Decision) -> AotStep:
        package = spec.package_path(self.directory)
        t0 = time.perf_counter()
        if decision.build == "foreground" and build_locked(self.params, spec, self.directory) is not None:
            self.log(f"compile: compiled the decode step in {time.perf_counter() - t0:.1f} s -> {package}")
        t1 = time.perf_counter()
        try:
            step = load_step(package, self.params, self.device, single_threaded=self.single_threaded)
        except Exception:
            package.unlink(missing_ok=True)  # unreadable: the next run builds it again
            raise
        self.log(f"compile: loaded {package.name} in {time.perf_counter() - t1:.2f} s")
        return step

    def _say(self, batch: int, line: str) -> None:
        """Log a decision when it is new for this batch size (not again while it stands)."""
        state = line.split(" (", 1)[0]
        if self._said.get(batch) != state:
            self._said[batch] = state
            self.log(line)


if __name__ == "__main__":
    sys.exit(main())
