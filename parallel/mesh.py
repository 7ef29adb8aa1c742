"""Named device meshes built from the torchrun environment.

    mesh = make_mesh("dp=2,tp=2")     # under `torchrun --nproc-per-node 4`
    mesh.size("tp"), mesh.rank_in("dp"), mesh.device_mesh["tp"]

Axes are among `pp`, `dp`, `fsdp`, `tp` and are always laid out in that order, outermost first,
so tensor-parallel peers are neighbouring ranks (one node) and pipeline stages are furthest
apart, whatever order the string names them in. One process (no torchrun) gives the trivial
mesh: every transform in this package becomes the identity on it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.cli import UserError

AXES = ("pp", "dp", "fsdp", "tp")
DATA_AXES = ("dp", "fsdp")  # the batch is split over these
DEFAULT_TIMEOUT_S = float(os.environ.get("AQUILA_DIST_TIMEOUT", "300"))


class MeshError(UserError, ValueError):
    """A mesh string that cannot describe the processes we have."""


def mesh_axes(spec: str | dict) -> dict[str, int]:
    """'dp=2,tp=-1' -> {'dp': 2, 'tp': -1}: the syntax, the axis names and the sizes (positive, or
    one -1) checked, without knowing the world size (`parse_mesh` resolves it)."""
    if isinstance(spec, dict):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in spec.replace(" ", "").split(","):
            name, eq, value = part.partition("=")
            if not eq:
                raise MeshError(f"mesh entry {part!r} is not of the form axis=size (e.g. 'dp=2,tp=2')")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh entry {part!r}: size {value!r} is not an integer") from None
    unknown = [a for a in sizes if a not in AXES]
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown[0]!r}; axes are {', '.join(AXES)}")
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise MeshError(f"at most one axis may be -1, got {free}")
    bad = [f"{a}={n}" for a, n in sizes.items() if n < 1 and n != -1]
    if bad:
        raise MeshError(f"mesh sizes must be positive, got {', '.join(bad)}")
    return sizes


def parse_mesh(spec: str | dict | None, world_size: int) -> dict[str, int]:
    """'dp=2,tp=2' -> {'dp': 2, 'tp': 2} in canonical axis order; one axis may be -1 ('the rest').

    Axes of size 1 are dropped. The product must equal `world_size`.
    """
    if spec is None or spec == "" or spec == {}:
        sizes = {"dp": world_size} if world_size > 1 else {}
    else:
        sizes = mesh_axes(spec)
    free = [a for a, n in sizes.items() if n == -1]
    if free:
        fixed = math.prod(n for n in sizes.values() if n != -1)
        if world_size % fixed:
            raise MeshError(f"mesh {spec!r}: {world_size} processes are not divisible by {fixed}")
        sizes[free[0]] = world_size // fixed
    if math.prod(sizes.values()) != world_size:
        raise MeshError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but there are "
                        f"{world_size} processes (torchrun --nproc-per-node)")
    return {a: sizes[a] for a in AXES if sizes.get(a, 1) > 1}


def device_type() -> str:
    """The accelerator this process drives: npu, cuda or cpu."""
    if hasattr(torch, "npu") and torch.npu.is_available():  # torch_npu registers torch.npu
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _backend(dev: str) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(dev, "gloo")


def _process_group_backend(dev: str) -> str:
    """NCCL / HCCL for the accelerator's tensors, plus gloo for the CPU tensors a run reduces
    too (token counts, stop flags, loss sums kept on the host)."""
    main = _backend(dev)
    return main if main == "gloo" else f"cpu:gloo,{dev}:{main}"


def _device_kind(device) -> str:
    """The device type this process runs on: `device`'s, or the one found (device_type)."""
    return device_type() if device is None else torch.device(device).type


def overlapping_gathers_safe(mesh: "Mesh") -> bool:
    """Whether several asynchronous (functional-collective) all-gathers may be in flight at once.

    Not on gloo: with torch 2.13, two pending `funcol.all_gather_tensor` calls on 2 CPU ranks
    corrupt the heap within a few hundred iterations ("malloc(): unaligned tcache chunk
    detected", or a segfault in wait_tensor); one pending call, or c10d's own async ops, do
    not. NCCL and HCCL are built for overlapping collectives."""
    return _backend(mesh.device) != "gloo"


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, device=None) -> bool:
    """Join the torchrun process group (once); False when running as one plain process.

    The timeout bounds every collective: a dead or stalled peer becomes an error, not a hang.
    `device` (e.g. torch.device("cuda", 1); default: the accelerator found, at LOCAL_RANK)
    becomes this process's current device and picks the backend: nccl, hccl or gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    dev = _device_kind(device)
    if dev != "cpu":
        index = torch.device(device).index if device is not None else None
        getattr(torch, dev).set_device(int(os.environ.get("LOCAL_RANK", "0")) if index is None else index)
    dist.init_process_group(_process_group_backend(dev), timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown_distributed() -> None:
    """Leave the process group at the end of a run: every rank waits for the others, then the
    backend's threads are joined before the interpreter exits (left to exit-time destructors,
    gloo can abort a finished rank with "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Mesh:
    """Named axes over the processes, wrapping a DeviceMesh (None for the trivial mesh)."""

    axes: dict[str, int] = field(default_factory=dict)
    device_mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    device: str = "cpu"

    @property
    def trivial(self) -> bool:
        return self.device_mesh is None

    @property
    def world_size(self) -> int:
        return math.prod(self.axes.values()) if self.axes else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if not self.trivial else 0

    def size(self, axis: str | tuple[str, ...]) -> int:
        names = (axis,) if isinstance(axis, str) else axis
        return math.prod(self.axes.get(a, 1) for a in names)

    def rank_in(self, axis: str) -> int:
        """This process's coordinate along `axis` (0 when the axis is absent)."""
        if self.trivial or axis not in self.axes:
            return 0
        return self.device_mesh.get_local_rank(axis)

    def has(self, axis: str) -> bool:
        return axis in self.axes

    def submesh(self, names: tuple[str, ...]):
        """The DeviceMesh over `names` (those present), or None when none are."""
        present = tuple(a for a in names if a in self.axes)
        if not present or self.trivial:
            return None
        return self.device_mesh[present] if len(present) > 1 else self.device_mesh[present[0]]

    def group(self, axis: str):
        """The process group of this rank's peers along `axis`."""
        if self.trivial or axis not in self.axes:
            return None
        return self.device_mesh.get_group(axis)

    def without(self, axis: str) -> "Mesh":
        """The mesh of the remaining axes (e.g. a pipeline stage's mesh without `pp`)."""
        rest = {a: n for a, n in self.axes.items() if a != axis}
        if self.trivial or axis not in self.axes:
            return self
        return Mesh(rest, self.submesh(tuple(rest)) if rest else None, self.device)

    def __str__(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.axes.items()) or "single"


def make_mesh(spec: str | dict | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
              device=None) -> Mesh:
    """A named mesh over the torchrun processes; the trivial mesh for one process.

    `spec`: "dp=2,tp=2" (sizes may include one -1), a dict, or None for pure data parallelism.
    `device`: where this process runs (see init_distributed); the mesh is of its type.
    """
    distributed = init_distributed(timeout_s, device)
    world = dist.get_world_size() if distributed else 1
    axes = parse_mesh(spec, world)
    dev = _device_kind(device)
    if world == 1:
        return Mesh({}, None, dev)
    from torch.distributed.device_mesh import init_device_mesh

    if not axes:  # cannot happen for world > 1, parse_mesh guarantees the product
        raise MeshError(f"mesh {spec!r} is empty but there are {world} processes")
    names = tuple(axes)
    device_mesh = init_device_mesh(dev, tuple(axes[a] for a in names), mesh_dim_names=names)
    return Mesh(axes, device_mesh, dev)


def trivial_mesh() -> Mesh:
    return Mesh({}, None, device_type())


def mesh_spec(text: str) -> str:
    """argparse type of --mesh: axis names and sizes checked while the arguments are parsed."""
    try:
        mesh_axes(text)
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
