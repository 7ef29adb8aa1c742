"""Where a job runs: one `--device auto|cpu|cuda[:i]|npu[:i]` convention for every script.

    dev = device.resolve("auto")          # npu:0 / cuda:0 / cpu; LOCAL_RANK's device under torchrun
    batch = device.to_device(batch, dev)  # pinned host memory, non-blocking copy on accelerators
    print(device.header("pretrain", dev, precision="bf16"), file=sys.stderr)

`auto` takes an Ascend NPU when torch_npu is installed and sees one, else a CUDA GPU, else the
CPU. Without an index, a process started by torchrun takes device LOCAL_RANK of that type
(one process per device); an explicit index is used as given. A resolved accelerator is made the
current device of its type, so collectives and "cuda"/"npu" without an index mean it too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from typing import Any

import torch

ACCELERATORS = ("npu", "cuda")
CHOICES = "auto | cpu | cuda[:i] | npu[:i]"
_SPEC = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


class DeviceError(ValueError):
    """A --device that is malformed or names a device this machine does not have."""


def npu_module():
    """torch.npu when torch_npu is installed (importing it registers the device), else None."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return None
    return getattr(torch, "npu", None)


def _module(kind: str):
    """torch.cuda / torch.npu for an accelerator type, else None."""
    return {"cuda": lambda: torch.cuda, "npu": npu_module}.get(kind, lambda: None)()


def count(kind: str) -> int:
    """How many devices of `kind` this process sees (0 when its runtime is missing)."""
    if kind == "cpu":
        return 1
    mod = _module(kind)
    return mod.device_count() if mod is not None and mod.is_available() else 0


def _local_rank() -> int | None:
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def _missing(kind: str, spec: str) -> str:
    if kind == "npu" and npu_module() is None:
        return f"{spec}: torch_npu is not installed (pip install 'aquila-fn[npu]')"
    product = "CUDA" if kind == "cuda" else "Ascend NPU"
    return f"{spec}: no {product} device is visible to this process"


def resolve(spec: str | torch.device = "auto", *, activate: bool = True) -> torch.device:
    """The torch.device a --device string names; raises DeviceError (one line, naming the value)
    when it is malformed or absent. activate: make an accelerator the current device of its type."""
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    if m is None or (m.group(1) in ("auto", "cpu") and m.group(2)):
        raise DeviceError(f"{str(spec)!r} is not one of {CHOICES}")
    kind, index = m.group(1), (int(m.group(2)) if m.group(2) else None)
    if kind == "auto":
        kind = next((k for k in ACCELERATORS if count(k) > 0), "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    n = count(kind)
    if n == 0:
        raise DeviceError(_missing(kind, text))
    if index is None:
        index = _local_rank() or 0
        if index >= n:
            raise DeviceError(f"{text}: LOCAL_RANK is {index} but only {n} {kind} device(s) are "
                              "visible (torchrun starts one process per device)")
    elif index >= n:
        raise DeviceError(f"{text}: only {n} {kind} device(s) are visible ({kind}:0 .. {kind}:{n - 1})")
    device = torch.device(kind, index)
    if activate:
        _module(kind).set_device(device)
    return device


def of(args: argparse.Namespace) -> torch.device:
    """The device of parsed arguments (add_argument resolved it already); auto without one."""
    value = getattr(args, "device", None)
    return value if isinstance(value, torch.device) else resolve(value or "auto")


def parse_arg(text: str) -> torch.device:
    """argparse `type=` for --device: a bad value becomes argparse's one-line error, exit 2."""
    try:
        return resolve(text)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """The --device flag every job takes."""
    parser.add_argument("--device", type=parse_arg, default=default, metavar="DEVICE",
                        help=f"{CHOICES} (default {default}: npu, then cuda, then cpu; under "
                             "torchrun each process takes its LOCAL_RANK device)")


def is_accelerator(device: str | torch.device) -> bool:
    return torch.device(device).type in ACCELERATORS


def name(device: str | torch.device) -> str:
    """'cuda:0 (NVIDIA H200)', 'npu:0 (Ascend910B2)', 'cpu (16 threads)'."""
    device = torch.device(device)
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    try:
        product = _module(device.type).get_device_name(device)
    except (AttributeError, RuntimeError, AssertionError):  # no runtime for it (or meta)
        return str(device)
    return f"{device} ({product})"


def header(job: str, device: str | torch.device, **fields: Any) -> str:
    """The first stderr line of a job: where it runs, with what, on which torch."""
    parts = [f"device {name(device)}"] + [f"{k} {v}" for k, v in fields.items() if v is not None]
    return f"{job}: " + ", ".join(parts + [f"torch {torch.__version__}"])


def to_device(tree: Any, device: str | torch.device) -> Any:
    """Tensors of a (nested dict/list) batch on `device`. To an accelerator they go from pinned
    host memory with a non-blocking copy, so the transfer overlaps the host's next work; on the
    CPU nothing moves."""
    device = torch.device(device)
    accelerator = is_accelerator(device)

    def move(x):
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if not isinstance(x, torch.Tensor) or x.device == device:
            return x
        if accelerator and x.device.type == "cpu":
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)

    return move(tree)


def generator(device: str | torch.device, seed: int) -> torch.Generator:
    """A seeded random stream on `device` (sampling draws from a generator on the logits' device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def generator_from_state(state: torch.Tensor, device: str | torch.device) -> torch.Generator:
    """A generator on `device` from a checkpointed CPU generator state: the CPU state itself on
    the CPU, elsewhere a device generator seeded by the CPU stream's first draw, so a run resumed
    on the same device type samples the same way."""
    cpu = torch.Generator()
    cpu.set_state(state)
    if torch.device(device).type == "cpu":
        return cpu
    seed = int(torch.randint(0, 2 ** 62, (), generator=cpu))
    return generator(device, seed)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (before reading a clock); nothing to wait for on the CPU."""
    mod = _module(torch.device(device).type)
    if mod is not None:
        mod.synchronize(torch.device(device))
