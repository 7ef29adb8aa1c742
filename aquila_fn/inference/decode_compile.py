"""`--compile auto`: whether a run decodes with the ahead-of-time compiled step
(aquila_fn.inference.aot_package) and how it gets it: load it when cached, build it now when
this run repays the build, else decode eagerly and build it in the background for later runs
(aquila_fn.inference.aot_build). CompiledSteps applies that choice for one Decoder.

The package and build names below are re-exported here, where callers have imported them from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aquila_fn.core.config import ModelConfig
from aquila_fn.inference.aot_build import (BACKGROUND_ENV, LOCK_MAX_AGE_S, background_builds_enabled, build_in_progress,
                                           build_locked, main, start_background_build, wait_for_build)
from aquila_fn.inference.aot_package import (AOT_DEVICES, CACHE_BUCKET, CACHE_ENV, AotStep, StepSpec, build_package,
                                             cache_dir, canonical, example_inputs, export_step, failed_path,
                                             first_line, load_step)
from aquila_fn.inference.steps import decode_decompositions

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
MIN_BACKGROUND_SAVING_S = 1.0  # a background build only for runs that it would speed up this much

__all__ = [
    # the auto policy
    "BANDWIDTH", "EAGER_SLOWDOWN", "LAUNCH_S", "OPS_PER_LAYER", "DEFAULT_BUILD_S", "MIN_BACKGROUND_SAVING_S",
    "estimated_build_s", "estimated_saving_s", "repays", "default_build_s", "Decision", "decide", "CompiledSteps",
    # re-exported from aot_package and aot_build
    "CACHE_BUCKET", "CACHE_ENV", "AOT_DEVICES", "AotStep", "StepSpec", "build_package", "cache_dir", "canonical",
    "decode_decompositions", "example_inputs", "export_step", "load_step",
    "BACKGROUND_ENV", "LOCK_MAX_AGE_S", "background_builds_enabled", "build_in_progress", "build_locked", "main",
    "start_background_build", "wait_for_build",
]


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
    if failed_path(package).exists():
        return Decision(False, f"its last build failed ({failed_path(package).read_text()}; log "
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
                self.log(f"compile: no background build ({first_line(e)})")
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
            self.log(f"compile: off (the compiled step failed: {first_line(e)})")
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
