"""aquila_fn.core.device: the --device convention of every job, and its plumbing into the jobs.

No accelerator here: CUDA and NPU are faked by monkeypatching torch.cuda / a stand-in torch_npu
(device counts, set_device, names), which is all resolution reads. Where tensors must really
live elsewhere than on the CPU, the `meta` device stands in for the accelerator.
"""
import argparse
import subprocess
import sys

import pytest
import torch

import parallel
from aquila_fn.core import device, pytree
from aquila_fn.training import checkpoint
from aquila_fn.jobs import pretrain as pretrain_mod
from script_module import ROOT, load_script

ASSETS = ROOT / "aquila_fn" / "assets"


@pytest.fixture(autouse=True)
def no_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def no_npu(monkeypatch):
    monkeypatch.setattr(device, "npu_module", lambda: None)


@pytest.fixture
def fake_cuda(monkeypatch, no_npu):
    """Two visible 'NVIDIA H200's; `current` records set_device."""
    current = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(device=torch.device(d)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return current


# ----------------------------------------------------------------------------- resolution


def test_auto_is_the_cpu_without_accelerators(monkeypatch, no_npu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve("auto") == torch.device("cpu")
    assert device.resolve("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun on a CPU machine: every rank on the CPU
    assert device.resolve("auto") == torch.device("cpu")


def test_auto_takes_cuda_and_makes_it_current(fake_cuda):
    assert device.resolve("auto") == torch.device("cuda", 0)
    assert fake_cuda["device"] == torch.device("cuda", 0)
    assert device.resolve(" CUDA:1 ") == torch.device("cuda", 1)
    assert fake_cuda["device"] == torch.device("cuda", 1)


def test_under_torchrun_each_rank_takes_its_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device.resolve("auto") == device.resolve("cuda") == torch.device("cuda", 1)
    assert device.resolve("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(device.DeviceError, match="LOCAL_RANK is 2 but only 2 cuda"):
        device.resolve("auto")


NPU_CHECK = """
import os, sys, types, torch
from aquila_fn.core import device
# What importing torch_npu does: name the privateuse1 device "npu" (irreversible, hence this
# separate process) and register torch.npu. Eight Ascend 910B2 and two GPUs are visible.
torch.utils.rename_privateuse1_backend("npu")
current = {}
torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8,
                                  set_device=lambda d: current.update(device=torch.device(d)),
                                  get_device_name=lambda d=None: "Ascend910B2")
sys.modules["torch_npu"] = types.ModuleType("torch_npu")
torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 2)
os.environ["LOCAL_RANK"] = "5"
dev = device.resolve("auto")
print(dev, current["device"], device.name(dev), device.resolve("npu:2"))
"""


def test_npu_comes_before_cuda_and_takes_local_rank():
    out = subprocess.run([sys.executable, "-c", NPU_CHECK], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "npu:5 npu:5 npu:5 (Ascend910B2) npu:2"


@pytest.mark.parametrize("spec, message", [
    ("gpu", "'gpu' is not one of auto | cpu | cuda[:i] | npu[:i]"),
    ("cuda:x", "'cuda:x' is not one of"),
    ("cpu:1", "'cpu:1' is not one of"),
    ("auto:0", "'auto:0' is not one of"),
    ("", "'' is not one of"),
    ("cuda:2", "cuda:2: only 2 cuda device(s) are visible (cuda:0 .. cuda:1)"),
])
def test_bad_device_strings(fake_cuda, spec, message):
    with pytest.raises(device.DeviceError) as e:
        device.resolve(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_absent_devices_name_what_is_missing(monkeypatch, no_npu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(device.DeviceError, match="cuda:0: no CUDA device is visible"):
        device.resolve("cuda:0")
    with pytest.raises(device.DeviceError, match=r"npu: torch_npu is not installed \(pip install 'aquila-fn\[npu\]'\)"):
        device.resolve("npu")


def test_argparse_flag_resolves_once_and_fails_in_one_line(fake_cuda, capsys):
    p = argparse.ArgumentParser(prog="job")
    device.add_argument(p)
    assert p.parse_args([]).device == torch.device("cuda", 0)  # default auto
    assert p.parse_args(["--device", "cuda:1"]).device == torch.device("cuda", 1)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--device", "tpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err[-1] == "job: error: argument --device: 'tpu' is not one of auto | cpu | cuda[:i] | npu[:i]"


def test_header_names_the_device_precision_and_torch(fake_cuda):
    line = device.header("pretrain", torch.device("cuda", 0), precision="bf16", processes=None)
    assert line == f"pretrain: device cuda:0 (NVIDIA H200), precision bf16, torch {torch.__version__}"
    assert device.header("evaluate", "cpu").startswith("evaluate: device cpu (")


def test_peak_flops_follow_the_device(fake_cuda, monkeypatch):
    assert pretrain_mod.peak_flops("bf16", torch.device("cuda", 0)) == 989e12
    assert pretrain_mod.peak_flops("fp32", "cpu") == pretrain_mod.PEAK_TFLOPS["cpu"]["fp32"] * 1e12
    assert pretrain_mod.peak_flops("bf16", "cuda:0", 500.0) == 500e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA L4")
    assert pretrain_mod.peak_flops("bf16", "cuda:0") is None  # unknown: no MFU rather than a wrong one


def test_precision_auto_follows_the_device(fake_cuda, monkeypatch):
    from aquila_fn.training import train
    from ops import _dispatch
    monkeypatch.setattr(_dispatch, "NATIVE_CPU_MATMUL_DTYPES", frozenset({torch.float32}))
    assert train.default_precision(torch.device("cuda", 1)) == "bf16"
    assert train.default_precision("cpu") == "fp32"


# ----------------------------------------------------------------------------- data movement


def test_batches_go_through_pinned_memory_only_to_accelerators(monkeypatch):
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": [torch.zeros(2)], "n": 3}
    assert device.to_device(batch, "cpu")["input_ids"] is batch["input_ids"]  # nothing moves
    pinned, copies = [], []
    monkeypatch.setattr(device, "ACCELERATORS", ("meta",))  # meta plays the accelerator
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self)
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(k) or real_to(self, *a, **k))
    moved = device.to_device(batch, "meta")
    assert moved["input_ids"].device.type == moved["labels"][0].device.type == "meta" and moved["n"] == 3
    assert pinned == [torch.Size([2, 3]), torch.Size([2])]
    assert copies == [{"non_blocking": True}] * 2


def test_device_generators_come_from_the_checkpointed_cpu_state(monkeypatch):
    state = torch.Generator().manual_seed(7).get_state()
    cpu = device.generator_from_state(state, "cpu")
    assert torch.equal(cpu.get_state(), state)
    made = []
    monkeypatch.setattr(device, "generator", lambda where, seed: made.append((torch.device(where), seed)))
    device.generator_from_state(state, "cuda:1")
    device.generator_from_state(state, "cuda:1")
    assert made[0] == made[1] and made[0][0] == torch.device("cuda", 1)  # same state, same stream


def test_process_group_backend_follows_the_device():
    from parallel import mesh
    assert mesh._process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert mesh._process_group_backend("npu") == "cpu:gloo,npu:hccl"
    assert mesh._process_group_backend("cpu") == "gloo"
    assert parallel.make_mesh(device=torch.device("meta")).device == "meta"  # one process: trivial


# ----------------------------------------------------------------------------- the jobs


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def test_pretrain_materialises_state_on_the_run_device_and_restores_onto_it(tmp_path, data_cache):
    args = pretrain_mod.parse_args([
        "--model-overrides", "dim=32,n_layers=1,n_heads=2,n_kv_heads=1,ffn_dim=64", "--steps", "1",
        "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path), "--data-cache", data_cache])
    assert args.device == torch.device("cpu")
    cpu_run = pretrain_mod.setup(args)
    cpu_state, _ = pretrain_mod.fresh_state(cpu_run)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", cpu_state, step=0)
    args.device = torch.device("meta")  # the accelerator's stand-in
    run = pretrain_mod.setup(args)
    assert run.device == run.par.device == torch.device("meta")
    state, _ = pretrain_mod.fresh_state(run)
    on = {p: x.device.type for p, x in pytree.named_leaves({k: state[k] for k in ("params", "opt_state")})
          if isinstance(x, torch.Tensor) and x.is_floating_point()}
    assert set(on.values()) == {"meta"} and any(p.startswith("opt_state") for p in on), on
    assert state["rng"].device.type == "cpu"  # the checkpointed RNG state is a CPU generator's
    loaded, _ = checkpoint.load_checkpoint(path)  # written from CPU tensors, loaded onto the CPU
    restored = pretrain_mod.restore_into(state, loaded)
    for (p, want), got in zip(pytree.named_leaves(state), pytree.leaves(restored)):
        assert got.device == want.device and got.dtype == want.dtype and got.shape == want.shape, p
    back = pretrain_mod.restore_into(cpu_state, loaded)  # and onto the CPU, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(pytree.leaves(back), pytree.leaves(cpu_state)))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("script, argv, loader", [
    ("generate", [], "load_model"),
    ("evaluate", ["--task", "boolq", "--data", "x.jsonl", "--model", "m.bin"], "load_model_and_tokenizer"),
    ("finetune", ["--model", "m.bin", "--data", "x.json", "--out", "o"], "load_model_and_tokenizer"),
])
def test_scripts_load_onto_the_resolved_device_and_say_so(fake_cuda, monkeypatch, capsys, script, argv, loader):
    module = load_script(script)
    seen = {}

    def fake_loader(*a, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(module, loader, fake_loader)
    with pytest.raises(_Stop):
        module.main([*argv, "--device", "cuda:1"])
    assert seen["device"] == torch.device("cuda", 1) and fake_cuda["device"] == torch.device("cuda", 1)
    header = capsys.readouterr().err.splitlines()[0]
    assert header.startswith(f"{script}: device cuda:1 (NVIDIA H200), ")
    assert header.endswith(f"torch {torch.__version__}")
    if script == "finetune":
        assert "precision bf16" in header  # --precision auto on a bf16 device
    with pytest.raises(SystemExit) as e:
        module.main([*argv, "--device", "cuda:7"])
    assert e.value.code == 2 and "cuda:7: only 2 cuda device(s)" in capsys.readouterr().err
