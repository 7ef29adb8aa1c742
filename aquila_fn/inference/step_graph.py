"""The compiled decode step replayed as a captured CUDA graph (gpt-fast's recipe, made explicit).

Batch-1 decoding of a large model on a GPU runs a few hundred small kernels per token; launched
one by one from Python they take longer than the weight read they do. A CUDA graph replays them
all with one launch. A graph replays fixed addresses, so every tensor the step reads lives in a
buffer that stays put: the parameters and the static KV cache already do; the per-step inputs
(tokens, cache slot, rotary positions, key mask) are copied into buffers of the graph's own
before each replay (device-to-device, no allocation), and the logits come back in the graph's
output buffer, valid until the next call.

One graph is captured per KV cache (keyed by its buffers' addresses and shapes), so a decoder
that reuses its caches (or whose allocator hands the same blocks back) captures once; the
graphs of one GraphStep share one memory pool, which is safe because they never run at once and
each output is read right after its own replay.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

WARMUP_RUNS = 2  # before capture, on a side stream: lazy initialisations (cuBLAS, AOTI constants)


class CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls GraphStep needs (a stand-in replaces it in tests)."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):  # the step is idempotent: it rewrites the same cache slot
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Captured:
    graph: object
    tokens: torch.Tensor     # [B, 1]
    start_pos: torch.Tensor  # 0-d
    positions: torch.Tensor  # [B, 1]
    key_mask: torch.Tensor   # [B, L]
    logits: torch.Tensor | None = None

    def load(self, tokens, start_pos, positions, key_mask) -> None:
        """The step's inputs into the static buffers: in-place copies only."""
        self.tokens.copy_(tokens)
        self.start_pos.copy_(start_pos)
        self.positions.copy_(positions)
        self.key_mask.copy_(key_mask)


class GraphStep:
    """Wraps a compiled decode step `step(params, tokens, cache, start_pos, positions, key_mask)
    -> logits` so that each call replays a captured graph."""

    def __init__(self, step: Callable, *, new_graph: Callable | None = None, max_graphs: int = 4):
        self.step = step
        if new_graph is None:
            pool = torch.cuda.graph_pool_handle()
            new_graph = lambda: CudaGraph(pool)  # noqa: E731
        self.new_graph = new_graph
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0

    def __call__(self, params, tokens, cache, start_pos, positions, key_mask) -> torch.Tensor:
        key = (tuple(layer[name].data_ptr() for layer in cache for name in ("k", "v")),
               tuple(cache[0]["k"].shape), tuple(tokens.shape), tuple(key_mask.shape))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(key, params, tokens, cache, start_pos, positions, key_mask)
        else:
            self.graphs.move_to_end(key)
            captured.load(tokens, start_pos, positions, key_mask)
        captured.graph.replay()
        return captured.logits

    def _capture(self, key, params, tokens, cache, start_pos, positions, key_mask) -> _Captured:
        captured = _Captured(self.new_graph(), tokens.clone(), start_pos.clone(), positions.clone(),
                             key_mask.clone())
        captured.logits = captured.graph.capture(lambda: self.step(
            params, captured.tokens, cache, captured.start_pos, captured.positions, captured.key_mask))
        self.graphs[key] = captured
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return captured
