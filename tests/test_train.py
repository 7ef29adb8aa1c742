import pytest
import torch

from aquila_fn import get_config, init_params
from aquila_fn.core import pytree
from aquila_fn.training import optim, train

CFG = get_config("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)


def _batch(b=8, s=16, seed=0, ignore_rows=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (b, s + 1), generator=g)
    labels = x[:, 1:].clone()
    for row, n in (ignore_rows or {}).items():  # mask the first n labels of a row
        labels[row, :n] = -100
    return {"input_ids": x[:, :-1].contiguous(), "labels": labels}


def _make_step(opt, **kwargs):
    # Reference kernels: these tests are about the step's logic, and the fast paths' lazy
    # compilation would dominate their run time.
    return train.make_train_step(CFG, opt, impl="reference", **kwargs)


def _state(precision="fp32", lr=1e-2, scaler=train.LossScaleConfig()):
    opt = optim.adamw(optim.constant(lr), weight_decay=0.1, max_grad_norm=1.0)
    state = train.init_train_state(init_params(CFG, 0), opt, precision=precision, loss_scale=scaler)
    return opt, state


def test_micro_batches_are_token_weighted_like_one_batch():
    # Unequal token counts per micro-batch: a plain mean of micro-batch means would differ.
    batch = _batch(ignore_rows={0: 15, 1: 12, 2: 3, 5: 10})
    counts = [int(train.count_tokens(m)) for m in train.split_batch(batch, 4)]
    assert len(set(counts)) > 1
    opt, state = _state()
    seen = {}

    def capture(name):
        def transform(grads, loss_sum, n_tokens):
            seen[name] = pytree.tree_map(torch.clone, grads)
            return grads, loss_sum, n_tokens
        return transform

    one = _make_step(opt, micro_batches=1, precision="fp32", grad_transform=capture(1))
    four = _make_step(opt, micro_batches=4, precision="fp32", grad_transform=capture(4))
    s1, m1 = one(train.clone_state(state), batch)
    s4, m4 = four(train.clone_state(state), batch)
    assert m1["n_tokens"] == m4["n_tokens"] == sum(counts)
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for path, g1 in pytree.flatten_dict(seen[1]).items():
        torch.testing.assert_close(pytree.flatten_dict(seen[4])[path], g1, rtol=1e-5, atol=1e-7,
                                   msg=path)
    # ...and the updated parameters agree to fp32 round-off amplified by Adam's normalisation.
    for a, b in zip(pytree.leaves(s1["params"]), pytree.leaves(s4["params"])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _inject_inf(calls):
    def transform(grads, loss_sum, n_tokens):
        calls.append(1)
        if len(calls) == 1:  # overflow on the first step only
            pytree.leaves(grads)[3].view(-1)[0] = float("inf")
        return grads, loss_sum, n_tokens
    return transform


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    scaler = train.LossScaleConfig(init_scale=1024.0, growth_interval=2)
    opt, state = _state("fp16", scaler=scaler)
    before = train.clone_state(state)
    step = _make_step(opt, precision="fp16", loss_scale=scaler,
                                 grad_transform=_inject_inf([]))
    batch = _batch(b=2)
    state, m = step(state, batch)
    assert m["skipped"] == 1 and m["loss_scale"] == 1024.0
    assert float(state["loss_scale"]["scale"]) == 512.0
    assert int(state["step"]) == 1 and optim.update_count(state["opt_state"]) == 0
    for a, b in zip(pytree.leaves(before["params"]), pytree.leaves(state["params"])):
        assert torch.equal(a, b)
    for a, b in zip(pytree.leaves(before["opt_state"]), pytree.leaves(state["opt_state"])):
        assert torch.equal(a, b)
    # Good steps update the params; the scale grows back after growth_interval of them.
    state, m = step(state, batch)
    assert m["skipped"] == 0 and optim.update_count(state["opt_state"]) == 1
    assert float(state["loss_scale"]["scale"]) == 512.0
    state, m = step(state, batch)
    assert float(state["loss_scale"]["scale"]) == 1024.0
    assert not torch.equal(pytree.leaves(before["params"])[3], pytree.leaves(state["params"])[3])


def test_fp16_scale_never_drops_below_min():
    scaler = train.LossScaleConfig(init_scale=2.0, min_scale=1.0)
    opt, state = _state("fp16", scaler=scaler)
    calls = []

    def always_inf(grads, loss_sum, n):
        calls.append(1)
        pytree.leaves(grads)[0].view(-1)[0] = float("nan")
        return grads, loss_sum, n

    step = _make_step(opt, precision="fp16", loss_scale=scaler,
                                 grad_transform=always_inf)
    for _ in range(3):
        state, m = step(state, _batch(b=2))
        assert m["skipped"] == 1
    assert float(state["loss_scale"]["scale"]) == 1.0 and len(calls) == 3


def test_fp16_training_matches_fp32_closely_and_unscales_gradients():
    batch = _batch(b=4)
    opt, s32 = _state("fp32")
    _, s16 = _state("fp16")
    _, m32 = _make_step(opt, precision="fp32")(s32, batch)
    _, m16 = _make_step(opt, precision="fp16")(s16, batch)
    assert m16["skipped"] == 0 and m16["loss_scale"] == 2.0 ** 16
    assert m16["loss"] == pytest.approx(m32["loss"], rel=1e-2)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=5e-2)


def test_bf16_keeps_fp32_master_weights_and_learns():
    opt, state = _state("bf16", lr=3e-3)
    step = _make_step(opt, precision="bf16", micro_batches=2)
    batch = _batch(b=4)
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(m["loss"])
    assert all(p.dtype == torch.float32 for p in pytree.leaves(state["params"]))
    assert losses[-1] < losses[0] - 0.3
    assert float(state["loss_scale"]["scale"]) == 1.0


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_recompute_policies_give_the_same_gradients(policy):
    batch = _batch(b=2)
    opt, state = _state()
    _, ref = _make_step(opt, precision="fp32")(train.clone_state(state), batch)
    _, got = _make_step(opt, precision="fp32", recompute=policy)(state, batch)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_compiled_loss_has_no_graph_break(policy):
    loss = train.make_loss(CFG, compute_dtype=torch.bfloat16, recompute=policy)
    explanation = torch._dynamo.explain(loss)(init_params(CFG, 0), _batch(b=2))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_train_step_fullgraph_matches_eager():
    # fullgraph=True raises on any graph break; aot_eager compiles forward and backward
    # through AOTAutograd without the cost of code generation.
    batch = _batch(b=4, ignore_rows={1: 5})
    opt, state = _state()
    eager = train.make_train_step(CFG, opt, precision="fp32", micro_batches=2)
    compiled = train.make_train_step(CFG, opt, precision="fp32", micro_batches=2, compile="aot_eager")
    s_e, m_e = eager(train.clone_state(state), batch)
    s_c, m_c = compiled(state, batch)
    s_c, m_c = compiled(s_c, batch)  # a second call reuses the graph (no recompilation error)
    s_e, m_e = eager(s_e, batch)
    assert m_c["loss"] == pytest.approx(m_e["loss"], rel=1e-5)
    for a, b in zip(pytree.leaves(s_e["params"]), pytree.leaves(s_c["params"])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_metrics_and_state_layout():
    opt = optim.adamw(optim.warmup_linear(1e-3, 2, 10))
    state = train.init_train_state(init_params(CFG, 0), opt, precision="bf16")
    step = _make_step(opt, precision="bf16")
    state, m = step(state, _batch(b=2, ignore_rows={0: 4}))
    assert set(m) >= {"loss", "grad_norm", "lr", "n_tokens", "skipped", "loss_scale"}
    assert m["lr"] == pytest.approx(5e-4) and m["n_tokens"] == 2 * 16 - 4 and m["skipped"] == 0
    assert set(state) == {"params", "opt_state", "step", "loss_scale"}
    assert all(isinstance(x, torch.Tensor) for x in pytree.leaves(state))
    assert int(state["step"]) == 1


def test_eval_loss_is_token_weighted():
    params = init_params(CFG, 0)
    a, b = _batch(b=2, seed=1, ignore_rows={0: 10}), _batch(b=2, seed=2)
    eval_loss = train.make_eval_loss(CFG, precision="fp32", impl="reference")
    joined = {k: torch.cat([a[k], b[k]]) for k in a}
    assert eval_loss(params, [a, b]) == pytest.approx(eval_loss(params, [joined]), rel=1e-6)


def test_bad_inputs_raise_clear_errors():
    opt, state = _state()
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        train.make_train_step(CFG, opt, precision="fp8")
    with pytest.raises(ValueError, match="recompute='some'"):
        train.make_train_step(CFG, opt, recompute="some")
    step = _make_step(opt, micro_batches=3, precision="fp32")
    with pytest.raises(ValueError, match="does not split into 3"):
        step(state, _batch(b=4))


def test_default_precision_is_known():
    assert train.default_precision("cpu") in ("bf16", "fp32")
