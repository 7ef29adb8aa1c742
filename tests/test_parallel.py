"""parallel/: meshes, rule tables, the single-process identity, and (multi-process, gloo on CPU)
every layout's losses and gradients against one process."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

import parallel
from aquila_fn.core import model
from aquila_fn.training import optim, pipeline_stages, sharding
from aquila_fn.core.config import get_config
from dist_launch import results, torchrun
from parallel.layout import Layout
from parallel.mesh import Mesh, MeshError, parse_mesh
from parallel.rules import RuleError, match

R, S0, S1 = Replicate(), Shard(0), Shard(1)


def fake_layout(axes: dict, **kw) -> Layout:
    """A layout over named axes without processes: enough to resolve placements."""
    return Layout(Mesh(axes, None, "cpu"), sharding.RULES, **kw)


# ----------------------------------------------------------------------------- meshes


def test_mesh_axes_are_canonically_ordered_and_size_one_axes_dropped():
    assert list(parse_mesh("tp=2,dp=2", 4)) == ["dp", "tp"]
    assert parse_mesh("pp=2,tp=1,fsdp=2", 4) == {"pp": 2, "fsdp": 2}
    assert parse_mesh("dp=-1,tp=2", 8) == {"dp": 4, "tp": 2}
    assert parse_mesh(None, 4) == {"dp": 4}
    assert parse_mesh(None, 1) == {}


@pytest.mark.parametrize("spec, world, words", [
    ("dp=2,tp=2", 2, "4 devices but there are 2 processes"),
    ("xp=2", 2, "unknown mesh axis 'xp'"),
    ("dp2", 2, "axis=size"),
    ("dp=two", 2, "not an integer"),
    ("dp=-1,tp=-1", 4, "at most one axis"),
    ("dp=-1,tp=3", 4, "not divisible by 3"),
])
def test_mesh_errors_say_what_is_wrong(spec, world, words):
    with pytest.raises(MeshError, match=words):
        parse_mesh(spec, world)


def test_one_process_is_the_trivial_mesh_and_every_transform_the_identity():
    mesh = parallel.make_mesh()
    assert mesh.trivial and mesh.world_size == 1 and str(mesh) == "single"
    with pytest.raises(MeshError):
        parallel.make_mesh("tp=2")  # asks for 2 processes, there is 1
    layout = sharding.make_layout(mesh, zero=3)
    config = get_config("tiny").replace(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64)
    params = model.init_params(config, 0)
    assert parallel.shard(params, layout) is params
    assert parallel.gather(params)["embed"] is params["embed"]
    assert parallel.compute_view(params, layout, stream="layers") is params
    x = torch.randn(2, 3, 4)
    assert parallel.constrain(x, ("batch", "seq", None)) is x
    with layout.activate():
        assert parallel.constrain(x, ("batch", "seq", None)) is x
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert parallel.shard_batch(batch, layout) is batch
    opt = optim.adamw(1e-3)
    assert parallel.distributed_optimizer(opt, layout) is opt
    # sharded initialisation is plain initialisation here
    init = sharding.init_params(config, 0, layout)
    assert all(torch.equal(a, b) for a, b in zip(parallel.tree.leaves(init), parallel.tree.leaves(params)))


# ----------------------------------------------------------------------------- rule tables


def test_first_matching_rule_wins():
    rules = [(r"attn\.wq$", ("tp",)), (r"attn", (None, "tp")), (r".*", ())]
    assert match(rules, "layers.0.attn.wq") == (("tp",),)
    assert match(rules, "layers.0.attn.wk") == (None, ("tp",))
    assert match(rules, "norm") == ()


def test_an_unmatched_leaf_is_an_error_naming_its_path():
    layout = Layout(Mesh({"tp": 2}, None, "cpu"), [(r"attn", ("tp",))])
    params = model.param_shapes(get_config("tiny"))
    with pytest.raises(RuleError, match="'embed'"):
        layout.tree_placements(params)


@pytest.mark.parametrize("rules, words", [
    ([(r"(", ("tp",))], "bad regex"),
    ([(r".*", ("tp", "dp", None))], "has 2 dims"),
    ([(r".*", ("tpp",))], "unknown axis name 'tpp'"),
    ([(r".*", ("tp", "tp"))], "splits both dim 0 and dim 1"),
    ([(r".*", 3)], "must be a tuple"),
    ([(r".*",)], "must be \\(regex, spec\\)"),
])
def test_malformed_rules_are_errors(rules, words):
    with pytest.raises(RuleError, match=words):
        layout = Layout(Mesh({"dp": 2, "tp": 2}, None, "cpu"), rules)
        layout.leaf_placements("layers.0.attn.wq", 2)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"merged": True}])
def test_aquila_rules_cover_every_leaf(overrides):
    merged = overrides.pop("merged", False)
    params = model.param_shapes(get_config("tiny", **overrides))
    if merged:
        params = model.merge_projections(params)
    layout = fake_layout({"dp": 2, "tp": 2})
    for path, leaf in parallel.tree.named_leaves(params):
        assert len(layout.leaf_placements(path, leaf.dim())) == 2, path


def test_megatron_splits_and_zero_stages_resolve_to_placements():
    tp = fake_layout({"dp": 2, "tp": 2})
    assert tp.leaf_placements("layers.0.attn.wq", 2) == (R, S0)         # column
    assert tp.leaf_placements("layers.0.mlp.w_up", 2) == (R, S0)
    assert tp.leaf_placements("layers.0.attn.wo", 2) == (R, S1)         # row
    assert tp.leaf_placements("layers.0.mlp.w_down", 2) == (R, S1)
    assert tp.leaf_placements("embed", 2) == (R, S0)                    # vocabulary
    assert tp.leaf_placements("lm_head", 2) == (R, S0)
    assert tp.leaf_placements("layers.0.attn_norm", 1) == (R, R)
    for zero, want in [(0, (R, R, R)), (1, (R, S1, S1)), (2, (R, S1, S1)), (3, (S1, S1, S1))]:
        layout = fake_layout({"dp": 2, "tp": 2}, zero=zero)
        got = tuple(layout.leaf_placements("layers.0.attn.wq", 2, kind)[0] for kind in ("params", "grads", "opt"))
        assert got == (want[0] if zero >= 3 else R, want[1] if zero >= 2 else R, want[2] if zero >= 1 else R)
    fsdp = fake_layout({"fsdp": 2, "tp": 2})  # an fsdp axis is stage 3 over that axis
    assert fsdp.leaf_placements("layers.0.attn.wq", 2) == (S1, S0)
    assert fsdp.leaf_placements("layers.0.attn.wq", 2, "compute") == (R, S0)
    sp = fake_layout({"dp": 2, "tp": 2}, sequence_parallel=True)
    assert sp.placements(model.RESIDUAL, 3, "act") == (S0, S1)
    assert sp.placements(model.FULL_SEQ, 3, "act") == (S0, R)


@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_stages_split_the_layers_and_hold_the_embedding_at_both_ends_when_tied(tied):
    config = get_config("tiny", tie_embeddings=tied)
    stages = [pipeline_stages.stage_shapes(config, s, 3) for s in range(3)]
    assert [list(s["layers"]) for s in stages] == [["0", "1"], ["2"], ["3"]]
    assert [sorted(k for k in s if k != "layers") for s in stages] == \
        [["embed"], [], ["embed", "norm"] if tied else ["lm_head", "norm"]]
    # a stage's leaves keep their one-process paths and shapes, so checkpoints and rules apply
    one = dict(parallel.tree.named_leaves(model.param_shapes(config)))
    for s in stages:
        for path, leaf in parallel.tree.named_leaves(s):
            assert one[path].shape == leaf.shape, path


@pytest.mark.parametrize("schedule, virtual", [("1f1b", 1), ("interleaved", 2)])
def test_one_f_one_b_with_fewer_micro_batches_than_stages_is_a_mesh_error(schedule, virtual):
    """Caught with the flags, before any process group work (torch's schedule would raise a
    ValueError inside init on every rank); GPipe runs with one micro-batch."""
    from types import SimpleNamespace

    mesh = Mesh({"pp": 2}, object(), "cpu")
    args = SimpleNamespace(precision="fp32", virtual_stages=virtual, pp_schedule=schedule, recompute="none")
    with pytest.raises(MeshError, match="at least 2 micro-batches per step, got 1.*--micro-batch-size"):
        pipeline_stages.PipelineOptions.from_args(args, mesh, micro_batches=1)
    assert pipeline_stages.PipelineOptions.from_args(args, mesh, micro_batches=2).micro_batches == 2
    gpipe = SimpleNamespace(precision="fp32", virtual_stages=1, pp_schedule="gpipe", recompute="none")
    assert pipeline_stages.PipelineOptions.from_args(gpipe, mesh, micro_batches=1).schedule == "gpipe"


def test_compiled_layers_on_a_mesh_refuse_selective_recomputation():
    layout = Layout(Mesh({"dp": 2}, object(), "cpu"), sharding.RULES)  # a mesh of 2 (never used)
    with pytest.raises(ValueError, match="selective"):
        sharding.make_train_step(get_config("tiny"), optim.adamw(1e-3), layout, compile=True,
                                 recompute="selective")


def test_compiled_code_traces_activation_constraints(tmp_path):
    """A compiled layer on a mesh calls `constrain`: torch.compile traces it without a graph break
    (the active layout is a plain global the compiled code is guarded on) and places the
    activation as eager code does (sequence parallelism: the sequence all-gathered)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already active")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        layout = Layout(Mesh({"dp": 1, "tp": 1}, device_mesh, "cpu"), sharding.RULES, sequence_parallel=True)
        x = distribute_tensor(torch.randn(2, 4, 8), device_mesh, [S0, S1])  # model.RESIDUAL
        fn = lambda t: parallel.constrain(t * 2, model.FULL_SEQ)
        with layout.activate():
            explained = torch._dynamo.explain(fn)(x)
            compiled = torch.compile(fn, backend="eager", fullgraph=True)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert compiled.placements == (S0, R)
        torch.testing.assert_close(compiled.full_tensor(), x.full_tensor() * 2)
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_needs_a_tp_axis():
    with pytest.raises(ValueError, match="tp axis"):
        fake_layout({"dp": 2}, sequence_parallel=True)


# ----------------------------------------------------------------------------- multi-process equality

# "<mesh>[;zero=N][;sp][;offload][;micro=M][;fp16]" -> expected placements of layers.0.attn.wq's
# parameter and Adam moment (what each layout shards).
LAYOUTS_2 = {
    "dp=2": ("(Replicate(),)", "(Replicate(),)"),
    "dp=2;zero=1": ("(Replicate(),)", "(Shard(dim=1),)"),
    "dp=2;zero=2;micro=2": ("(Replicate(),)", "(Shard(dim=1),)"),
    "dp=2;zero=3;micro=2;fp16": ("(Shard(dim=1),)", "(Shard(dim=1),)"),
    "fsdp=2": ("(Shard(dim=1),)", "(Shard(dim=1),)"),
    "fsdp=2;recompute=full": ("(Shard(dim=1),)", "(Shard(dim=1),)"),
    "fsdp=2;recompute=selective": ("(Shard(dim=1),)", "(Shard(dim=1),)"),
    "tp=2": ("(Shard(dim=0),)", "(Shard(dim=0),)"),
    "tp=2;sp": ("(Shard(dim=0),)", "(Shard(dim=0),)"),
    "dp=2;zero=1;offload": ("(Replicate(),)", "(Shard(dim=1),)"),
    "dp=2;micro=2;fp16": ("(Replicate(),)", "(Replicate(),)"),
    "dp=2;micro=2": ("(Replicate(),)", "(Replicate(),)"),
    # each layer compiled (regional compilation; aot_eager: dynamo's capture through DTensor,
    # ZeRO-3's gathers and resharding hooks, without code generation's minutes on 2 cores)
    "fsdp=2;compile=aot_eager": ("(Shard(dim=1),)", "(Shard(dim=1),)"),
}
# pipeline layouts (tied embeddings unless untied): rank 0 holds the first stage's layers (of 4);
# its placements are not shown
LAYOUTS_PP_2 = {
    "pp=2;micro=2": ("0,1", ""),
    "pp=2;micro=2;v=2": ("0,2", ""),  # interleaved 1F1B: stages 0 and 2 of 4
    "pp=2;micro=2;schedule=gpipe;fp16": ("0,1", ""),
    "pp=2;micro=2;v=2;fp16": ("0,2", ""),
    "pp=2;micro=2;untied": ("0,1", ""),
}
LAYOUTS_4 = {
    "dp=2,tp=2": ("(Replicate(), Shard(dim=0))", "(Replicate(), Shard(dim=0))"),
    "dp=2,tp=2;sp;zero=1": ("(Replicate(), Shard(dim=0))", "(Shard(dim=1), Shard(dim=0))"),
    "fsdp=2,tp=2": ("(Shard(dim=1), Shard(dim=0))", "(Shard(dim=1), Shard(dim=0))"),
    "dp=2,fsdp=2;zero=2": ("(Replicate(), Shard(dim=1))", "(Shard(dim=1), Shard(dim=1))"),
    "pp=2,tp=2;micro=2": ("0,1", ""),
    "pp=2,dp=2;micro=2;zero=1": ("0,1", ""),
    "pp=2,fsdp=2;micro=2": ("0,1", ""),  # ZeRO-3 in the stages
    "pp=4;micro=4": ("0", ""),  # the tied embedding's group: first and last of 4 pp ranks
}


def check_layouts(records: list[dict], expected: dict) -> None:
    assert [r["layout"] for r in records] == list(expected)
    for r in records:
        for got, want in zip(r["losses"], r["ref"]):
            assert abs(got - want) <= 1e-4 * abs(want), (r["layout"], r["losses"], r["ref"])
        if r["grad_rel_diff"] is not None:  # (pipelines are checked through their losses)
            assert r["grad_rel_diff"] < 1e-5, r
        # fp16: the steps one process skips for overflow (some are), skipped by every rank
        assert all(s == r["skipped_ref"] for s in r["skipped"]), r
        assert ("fp16" in r["layout"]) == any(r["skipped_ref"]), r
        if "valid" in r:  # pipelines: validation, the parameters, the tied copies
            check_pipeline(r)
        axes = [part.split("=")[0] for part in r["layout"].split(";")[0].split(",")]
        if {"dp", "fsdp"} & set(axes) and "pp" not in axes:
            check_overlap(r, split="fsdp" in axes or "zero=3" in r["layout"])
        assert (r["placements"]["param"], r["placements"]["moment"]) == expected[r["layout"]], r
        if ("fsdp" in axes or "zero=3" in r["layout"]) and "pp" not in axes:
            # ZeRO-3 reshards after forward under every recomputation policy: the graph keeps
            # re-gathers, not gathered weights (parallel.zero.ReshardAfterForward), and
            # recomputed layers gather theirs again anyway
            assert r["gathered_layer_bytes_after_forward"] == 0, r
            # in bf16 the compute-dtype copies of the weights, too (they are what matmuls save)
            assert r["gathered_layer_bytes_after_bf16_forward"] == 0, r
            assert r["bf16_grads_same_without_resharding"] is True, r
        if "async_gathers" in r:
            # gloo corrupts the heap with overlapping functional all-gathers: the ZeRO-3
            # prefetch runs synchronously there (parallel.mesh.overlapping_gathers_safe)
            assert r["async_gathers"] == 0, r


def check_overlap(r: dict, split: bool) -> None:
    """Per micro-batch backward: the gradient buckets sent in all, and those sent while
    gradients were still arriving (so the communication overlapped the backward)."""
    b = r["buckets_during_backward"]
    assert b["before_last_grad"][-1] > 0, r
    if split:  # ZeRO-3: each micro-batch's shards are reduce-scattered during its backward
        assert all(n > 0 for n in b["before_last_grad"]), r
    else:  # replicated: reduced once, during the last micro-batch's backward (DDP's no_sync)
        assert all(n == 0 for n in b["launched"][:-1]), r
    if len(b["launched"]) > 1:  # and the result is that of reducing after backward, bit for bit
        assert r["same_bits_as_post_backward_reduction"] is True, r


def check_pipeline(r: dict) -> None:
    # the forward-only pass gives one process's validation loss (batches of other shapes)
    assert abs(r["valid"] - r["valid_ref"]) <= 1e-4 * abs(r["valid_ref"]), r
    # the parameters after the last step (a tenth of the learning rate: Adam normalises each
    # element's update, so rounding differences in near-zero gradients show as up to ~lr/20),
    # and the tied embedding's two copies bit-identical
    assert r["param_diff"] < 1e-3, r
    copies = [e for e in r["tied_copies_equal"] if e is not None]  # per rank of the end stages
    assert (copies == []) if "untied" in r["layout"] else (copies and all(copies)), r


def test_every_two_process_layout_matches_one_process():
    layouts = {**LAYOUTS_2, **LAYOUTS_PP_2}
    check_layouts(results(torchrun("dist_layouts.py", 2, *layouts)), layouts)


@pytest.mark.slow
def test_combined_four_process_layouts_match_one_process():
    check_layouts(results(torchrun("dist_layouts.py", 4, *LAYOUTS_4)), LAYOUTS_4)
