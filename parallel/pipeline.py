"""Pipeline parallelism: a thin adapter from functional stages to torch.distributed.pipelining.

A stage is `fn(params, *inputs) -> output` over a pytree of parameters. `StageModule` presents
it as the nn.Module the library wants (the pytree's leaves become its parameters, shared, not
copied), and `Pipeline` builds the PipelineStages of this rank and one of the library's
schedules: GPipe, 1F1B, or interleaved 1F1B with several (virtual) stages per rank.

    bounds = stage_bounds(n_layers, pp * virtual)          # which layers each stage holds
    pipe = Pipeline([(index, params_subtree, fn), ...], n_stages, group, "1f1b", micro_batches, loss_fn)
    losses = pipe.step(inputs, target)                      # gradients land in the params' .grad

Stages hand plain (local) tensors to each other; inside a stage the model may run on DTensors
over the rest of the mesh (data and tensor parallelism within the stage).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from parallel.mesh import MeshError
from parallel.tree import leaves, structure, unflatten

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
        device = torch.device(device)
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
        self.schedule.step(inputs, target=target, losses=losses, return_outputs=False)
        return losses if self.has_last else []
