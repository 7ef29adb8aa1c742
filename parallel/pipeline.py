"""Pipeline parallelism: a thin adapter from functional stages to torch.distributed.pipelining.

A stage is `fn(params, *inputs) -> output` over a pytree of parameters. `StageModule` presents
it as the nn.Module the library wants (the pytree's leaves become its parameters, shared, not
copied), and `Pipeline` builds the PipelineStages of this rank and one of the library's
schedules: GPipe, 1F1B, or interleaved 1F1B with several (virtual) stages per rank.

    bounds = stage_bounds(n_layers, pp * virtual)          # which layers each stage holds
    pipe = Pipeline([(index, params_subtree, fn), ...], n_stages, group, "1f1b", micro_batches, loss_fn)
    losses = pipe.step(inputs, target)                      # gradients land in the params' .grad
    results = pipe.forward([(inputs, target), ...], loss)  # forward only (validation), any shapes

Stages hand plain (local) tensors to each other; inside a stage the model may run on DTensors
over the rest of the mesh (data and tensor parallelism within the stage).

`SharedLeaves` keeps leaves that two stages hold as copies of one weight (Megatron's tied input
embedding and output layer) identical: their gradients are summed over the group of ranks
holding a copy before the optimizer step, and only the first copy counts in the gradient norm.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from parallel.mesh import MeshError
from parallel.tree import leaves, named_leaves, structure, unflatten

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def stage_bounds(n_items: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, stop) item ranges, earlier stages taking the remainder."""
    if n_stages < 1 or n_items < n_stages:
        raise MeshError(f"cannot split {n_items} layers into {n_stages} pipeline stages "
                        f"(each stage needs at least one layer)")
    base, extra = divmod(n_items, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def rank_stages(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """The (looped) stage indices one pp rank holds: r, r + pp, r + 2pp, ..."""
    return [pp_rank + k * pp for k in range(virtual)]


class StageModule(nn.Module):
    """A functional stage as an nn.Module; `tree()` gives the parameters back as the pytree."""

    def __init__(self, params: Any, fn: Callable):
        super().__init__()
        self._spec = structure(params)
        self.flat = nn.ParameterList([p if isinstance(p, nn.Parameter) else nn.Parameter(p)
                                      for p in leaves(params)])
        self._fn = fn

    def tree(self) -> Any:
        return unflatten(self._spec, list(self.flat))

    def forward(self, *inputs):
        return self._fn(self.tree(), *inputs)


def _schedule_class(name: str, virtual: int):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if virtual > 1 or name == "interleaved":
        return ScheduleInterleaved1F1B
    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]


class Pipeline:
    """This rank's stages and a schedule over them."""

    def __init__(self, stages: list[tuple[int, Any, Callable]], n_stages: int, group, schedule: str,
                 micro_batches: int, loss_fn: Callable, device: torch.device | str = "cpu"):
        from torch.distributed.pipelining import PipelineStage

        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
        self.modules = [StageModule(params, fn) for _, params, fn in stages]
        self.indices, self.n_stages, self.group = [index for index, _, _ in stages], n_stages, group
        device = self.device = torch.device(device)
        self.stages = [PipelineStage(m, index, n_stages, device, group=group)
                       for (index, _, _), m in zip(stages, self.modules)]
        cls = _schedule_class(schedule, len(stages))
        # scale_grads=False: the loss is already weighted by 1/(global tokens), so micro-batch
        # gradients add up to the gradient of the global mean, as in one process.
        if cls.__name__ == "ScheduleInterleaved1F1B":
            if micro_batches % group.size():
                raise MeshError(f"interleaved 1F1B needs the micro-batches ({micro_batches}) to be a "
                                f"multiple of the pipeline size ({group.size()})")
            self.schedule = cls(self.stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
        else:
            if len(self.stages) != 1:
                raise MeshError(f"{schedule} runs one stage per rank; use interleaved for virtual stages")
            self.schedule = cls(self.stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
        self.has_last = any(s.is_last for s in self.stages)

    def params(self) -> list[Any]:
        """Each local stage's parameter pytree (the module parameters themselves)."""
        return [m.tree() for m in self.modules]

    def zero_grad(self) -> None:
        for m in self.modules:
            for p in m.parameters():
                p.grad = None

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """One forward+backward over the micro-batches; returns the last stage's per-micro-batch
        losses ([] on other ranks). Gradients accumulate in the parameters' .grad."""
        losses: list = []
        # inputs go to the rank of the first stage, targets to the last one's (torch 2.11 refuses
        # inputs on the others)
        args = (inputs,) if 0 in self.indices else ()
        self.schedule.step(*args, target=target if self.has_last else None, losses=losses, return_outputs=False)
        return losses if self.has_last else []

    @torch.no_grad()
    def forward(self, batches: list[tuple[torch.Tensor, Any]], loss: Callable[[torch.Tensor, Any], Any]) -> list:
        """Forward only (validation), batch by batch through every stage; returns
        `loss(last stage output, target)` per batch on the rank holding the last stage ([] on
        the others). Each rank runs its stages in (batch, stage) order, receiving a stage's
        input from the rank of the stage before and sending its output on without waiting, so
        no rank waits on one that waits on it; a shape header precedes each activation, so the
        batches may have any shape (not only the training micro-batch's)."""
        results, sends = [], []
        for inputs, target in batches:
            for index, module in zip(self.indices, self.modules):
                x = inputs if index == 0 else self._recv(index - 1)
                y = module(x)
                if index == self.n_stages - 1:
                    results.append(loss(y, target))
                else:
                    sends += self._send(y, index + 1)
            for work in sends:  # bounded: at most one batch's activations in flight
                work.wait()
            sends.clear()
        return results

    def _peer(self, stage: int) -> int:
        """Global rank of the pp rank holding `stage` (looped placement: stage % pp)."""
        return dist.get_global_rank(self.group, stage % self.group.size())

    def _send(self, x: torch.Tensor, stage: int) -> list:
        x = x.contiguous()
        header = torch.zeros(_HEADER, dtype=torch.int64, device=x.device)
        header[:x.dim() + 2] = torch.tensor([_DTYPES.index(x.dtype), x.dim(), *x.shape])
        peer = self._peer(stage)
        return [dist.isend(header, peer, group=self.group), dist.isend(x, peer, group=self.group)]

    def _recv(self, stage: int) -> torch.Tensor:
        peer = self._peer(stage)
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, peer, group=self.group)
        code, ndim, *shape = header.tolist()
        x = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=self.device)
        dist.recv(x, peer, group=self.group)
        return x


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
_HEADER = 10  # dtype, ndim, up to 8 dims


class SharedLeaves:
    """Leaves that the first and the last pipeline stage hold as copies of one weight (Megatron's
    tied embedding: the first stage's input embedding is the last stage's output layer).

    After backward each copy has only its own stage's gradient; `all_reduce` sums them over the
    group of the ranks holding a copy (Megatron's embedding group), so the same optimizer step
    keeps the copies identical. The first stage's copy is the owner: only it counts in the
    gradient norm (`norm_skip`) and in checkpoints."""

    def __init__(self, paths: tuple[str, ...], group, owner: bool):
        self.paths, self.group, self.owner = tuple(paths), group, owner

    @classmethod
    def end_stages(cls, paths: tuple[str, ...], mesh) -> "SharedLeaves | None":
        """For `mesh`'s first and last pp ranks; None on the ranks between (a collective: every
        rank calls it, since building the groups is one)."""
        pp, me = mesh.size("pp"), mesh.rank_in("pp")
        if not paths or pp < 2:
            return None
        if pp == 2:
            group = mesh.group("pp")
        else:  # one group per coordinate of the other axes: (first, last) along pp
            grid = mesh.device_mesh.mesh.reshape(pp, -1)
            group, _ = dist.new_subgroups_by_enumeration(
                [[int(grid[0, j]), int(grid[-1, j])] for j in range(grid.shape[1])])
        return cls(paths, group, owner=me == 0) if me in (0, pp - 1) else None

    @property
    def norm_skip(self) -> tuple[str, ...]:
        return () if self.owner else self.paths

    @torch.no_grad()
    def all_reduce(self, grads: Any) -> Any:
        """Sum the shared leaves' gradients (in place) over the copies."""
        for path, g in named_leaves(grads):
            if path in self.paths and isinstance(g, torch.Tensor):
                dist.all_reduce(g._local_tensor if hasattr(g, "_local_tensor") else g, group=self.group)
        return grads
