"""Mixed precision without keeping the 16-bit weight casts for backward (train.recast_weights):
backward casts the fp32 master weights again, so gradients and losses are bit-identical and the
forward leaves 2 bytes per matrix parameter less alive."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from aquila_fn.core import model, pytree
from aquila_fn.core.config import get_config
from aquila_fn.core.transforms import value_and_grad
from aquila_fn.training import train
from ops.rotary import _rope_table_cached
from parallel.meter import LiveMeter

CONFIG = get_config("tiny").replace(n_layers=2)


def _params(config=CONFIG):
    return model.init_params(config, 0)


def _batch(config=CONFIG, rows=2, seq=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (rows, seq), generator=g)
    return {"input_ids": ids, "labels": ids.roll(-1, 1)}


def _loss_and_grads(loss_sum_fn, params, batch, **kw):
    vg = value_and_grad(lambda p: loss_sum_fn(p, batch, CONFIG, **kw)[0])
    return vg(params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_recast_gradients_are_bit_identical(recompute, dtype):
    params, batch = _params(), _batch()
    kw = dict(compute_dtype=dtype, recompute=recompute)
    kept_loss, kept = _loss_and_grads(model.loss_sum_fn, params, batch, **kw)
    recast_loss, recast = _loss_and_grads(train.recast_weights(model.loss_sum_fn), params, batch, **kw)
    assert torch.equal(kept_loss, recast_loss)
    a, b = pytree.flatten_dict(kept), pytree.flatten_dict(recast)
    assert a.keys() == b.keys()
    for path in a:
        assert torch.equal(a[path], b[path]), path


def _forward_live(loss_sum_fn, params, batch, **kw):
    params = pytree.tree_map(lambda x: x.detach().requires_grad_(), params)
    _rope_table_cached.cache_clear()  # each measured forward builds the rotary table
    with LiveMeter() as meter:
        total, _ = loss_sum_fn(params, batch, CONFIG, **kw)
    return meter.live - total.numel() * total.element_size()


def test_recast_frees_the_casts_of_every_matrix():
    params, batch = _params(), _batch()
    kw = dict(compute_dtype=torch.bfloat16)
    kept = _forward_live(model.loss_sum_fn, params, batch, **kw)
    recast = _forward_live(train.recast_weights(model.loss_sum_fn), params, batch, **kw)
    # every layer matrix's bf16 cast (2 bytes a parameter) is no longer alive after forward
    matrices = sum(x.numel() for layer in params["layers"] for x in pytree.leaves(layer) if x.dim() == 2)
    assert kept - recast == 2 * matrices, (kept, recast, matrices)
    # in fp32 there is nothing to recast: the wrapper changes nothing
    fp32 = dict(compute_dtype=torch.float32)
    assert _forward_live(model.loss_sum_fn, params, batch, **fp32) == \
        _forward_live(train.recast_weights(model.loss_sum_fn), params, batch, **fp32)


def test_train_step_in_bf16_recasts_and_steps_as_before():
    """The one-process train step uses recast_weights; its step equals the step that keeps casts."""
    from aquila_fn.training import optim

    batch = _batch()
    results = []
    for wrap in (True, False):
        opt = optim.adamw(1e-3, max_grad_norm=1.0)
        state = train.init_train_state(_params(), opt, precision="bf16")
        with mock.patch.object(train, "recast_weights", train.recast_weights if wrap else lambda f: f):
            step = train.make_train_step(CONFIG, opt, precision="bf16", recompute="selective")
            state, metrics = step(state, batch)
        results.append((metrics["loss"], pytree.leaves(state["params"])))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
