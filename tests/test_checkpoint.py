"""Native checkpoints: bit-exact round trips, checksums, truncation, atomicity, keep-K, shards."""

import os
import threading
import warnings
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from aquila_fn.training import checkpoint as C
from aquila_fn.training.checkpoint import rank_file
from aquila_fn.core.pytree import named_leaves


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    fp32 = torch.randn(4, 3, generator=g)
    fp32[0, 0], fp32[0, 1], fp32[0, 2] = float("nan"), -0.0, float("inf")  # bit patterns that matter
    return {
        "params": {"embed": fp32, "layers": [{"w": torch.randn(2, 5, generator=g).to(torch.bfloat16)},
                                             {"w": torch.randn(2, 5, generator=g).to(torch.bfloat16)}]},
        "opt_state": {"count": torch.tensor(7, dtype=torch.int64), "mu": (torch.arange(6).reshape(2, 3), None),
                      "flags": torch.tensor([True, False]), "half": torch.randn(3, generator=g).half()},
        "rng": g.get_state(),
        "numpy": np.arange(5, dtype=np.int64),
        "scalar": 1.5,
        "empty": torch.zeros(0, 4),
    }


def _bits(x):
    if isinstance(x, np.ndarray):
        return x.dtype.str, x.shape, x.tobytes()
    t = x.contiguous()
    return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _assert_same(a, b):
    la, lb = list(named_leaves(a)), list(named_leaves(b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        if isinstance(x, (torch.Tensor, np.ndarray)):
            assert _bits(x) == _bits(y), p
        else:
            assert x == y, p


def test_round_trip_is_bit_exact(tmp_path):
    state = _state()
    path = C.save_checkpoint(tmp_path, state, step=5, metadata={"config": {"dim": 8}, "data_position": 40})
    assert Path(path) == tmp_path / "step_00000005"
    assert sorted(os.listdir(path)) == ["rank00000.msgpack"]
    loaded, meta = C.load_checkpoint(path)
    _assert_same(state, loaded)
    assert meta == {"config": {"dim": 8}, "data_position": 40, "step": 5}
    assert isinstance(loaded["params"]["layers"], list) and isinstance(loaded["opt_state"]["mu"], tuple)
    assert loaded["opt_state"]["mu"][1] is None and loaded["scalar"] == 1.5
    assert loaded["params"]["layers"][0]["w"].dtype == torch.bfloat16
    # the RNG state restores the same stream
    g = torch.Generator()
    g.set_state(loaded["rng"])
    ref = torch.Generator()
    ref.set_state(state["rng"])
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=ref))


def test_file_is_a_plain_msgpack_stream_without_pickle(tmp_path):
    path = C.save_checkpoint(tmp_path, {"w": torch.ones(2, 2)}, step=1)
    with open(Path(path) / "rank00000.msgpack", "rb") as f:
        objects = list(msgpack.Unpacker(f, raw=False))
    assert objects[0]["format"] == "aquila-fn-checkpoint"
    header = msgpack.unpackb(objects[0]["header"])
    meta = msgpack.unpackb(objects[1]["meta"])
    assert header["records"] == 1
    assert meta["path"] == "w" and meta["dtype"] == "float32" and meta["shape"] == [2, 2]
    assert meta["global_shape"] == [2, 2] and meta["offsets"] == [0, 0]
    assert objects[2] == torch.ones(2, 2).numpy().tobytes()
    assert objects[3] == {"end": True, "records": 1}
    assert b"pickle" not in (Path(path) / "rank00000.msgpack").read_bytes()


def test_large_leaf_is_streamed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_file, "CHUNK_BYTES", 1000)
    w = torch.randn(3001)  # 12004 bytes -> 13 chunks
    loaded, _ = C.load_checkpoint(C.save_checkpoint(tmp_path, {"w": w}, step=0))
    assert torch.equal(loaded["w"], w)


def test_read_metadata_reads_only_the_header(tmp_path):
    path = C.save_checkpoint(tmp_path, _state(), step=3, metadata={"data_position": 12})
    f = Path(path) / "rank00000.msgpack"
    with open(f, "rb") as fh:
        unpacker = msgpack.Unpacker(fh, raw=False)
        unpacker.unpack()
        header_end = unpacker.tell()
    f.write_bytes(f.read_bytes()[:header_end])  # everything after the header is gone
    assert C.read_metadata(path) == {"data_position": 12, "step": 3}
    assert C.read_metadata(tmp_path)["step"] == 3  # a run directory: its latest checkpoint


@pytest.mark.parametrize("keep_bytes", [5, 200, -40, -3])
def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path, keep_bytes):
    path = C.save_checkpoint(tmp_path, _state(), step=1)
    f = Path(path) / "rank00000.msgpack"
    data = f.read_bytes()
    f.write_bytes(data[:keep_bytes])
    with pytest.raises(C.CheckpointError, match=r"rank00000\.msgpack: (truncated|corrupt)") as e:
        C.load_checkpoint(path)
    assert str(f) in str(e.value)


def test_corrupted_byte_is_caught_by_the_checksum(tmp_path):
    w = torch.arange(1000, dtype=torch.float32)
    path = C.save_checkpoint(tmp_path, {"a": torch.ones(3), "w": w}, step=1)
    f = Path(path) / "rank00000.msgpack"
    data = bytearray(f.read_bytes())
    at = bytes(data).find(w.numpy().tobytes()[2000:2016])
    data[at + 3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match=r"rank00000\.msgpack: checksum mismatch for leaf 'w'"):
        C.load_checkpoint(path)


def test_corrupted_header_is_detected(tmp_path):
    path = C.save_checkpoint(tmp_path, {"w": torch.ones(3)}, step=1, metadata={"note": "abcdefgh"})
    f = Path(path) / "rank00000.msgpack"
    data = bytearray(f.read_bytes())
    at = bytes(data).find(b"abcdefgh")
    data[at] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="header checksum mismatch"):
        C.read_metadata(path)


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    good = _state(0)
    C.save_checkpoint(tmp_path, good, step=1)
    real = rank_file._write_record
    calls = {"n": 0}

    def dying_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # about half of the leaves
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(rank_file, "_write_record", dying_write)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, _state(1), step=2)
    monkeypatch.setattr(rank_file, "_write_record", real)

    assert C.latest_checkpoint(tmp_path) == str(tmp_path / "step_00000001")
    assert not (tmp_path / "step_00000002").exists()
    found = C.load_latest(tmp_path)
    _assert_same(good, found[1])
    # the next save cleans the leftover temp dir
    C.save_checkpoint(tmp_path, good, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000003"]


def test_keep_last_k(tmp_path):
    for step in range(5):
        C.save_checkpoint(tmp_path, {"w": torch.full((2,), float(step))}, step=step, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [3, 4]
    state, meta = C.load_checkpoint(C.latest_checkpoint(tmp_path))
    assert meta["step"] == 4 and state["w"].tolist() == [4.0, 4.0]
    with pytest.raises(C.CheckpointError):
        C.save_checkpoint(tmp_path, {"w": torch.ones(1)}, step=9, keep=0)


def test_overwriting_a_step_replaces_it(tmp_path):
    C.save_checkpoint(tmp_path, {"w": torch.zeros(2)}, step=1)
    C.save_checkpoint(tmp_path, {"w": torch.ones(2)}, step=1)
    state, _ = C.load_checkpoint(tmp_path)
    assert state["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_load_latest_falls_back_past_a_damaged_checkpoint(tmp_path):
    C.save_checkpoint(tmp_path, {"w": torch.zeros(2)}, step=1)
    newest = C.save_checkpoint(tmp_path, {"w": torch.ones(2)}, step=2)
    f = Path(newest) / "rank00000.msgpack"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint.*loading .*step_00000001: .*step_00000002"):
        path, state, meta = C.load_latest(tmp_path)
    assert meta["step"] == 1 and path.endswith("step_00000001")
    assert C.load_latest(tmp_path / "empty") is None


def test_missing_checkpoint_and_bad_metadata_are_clear(tmp_path):
    with pytest.raises(C.CheckpointError, match="checkpoint not found"):
        C.load_checkpoint(tmp_path / "nope")
    with pytest.raises(C.CheckpointError, match=r"metadata\['gen'\] has type Generator"):
        C.save_checkpoint(tmp_path, {"w": torch.ones(1)}, step=0, metadata={"gen": torch.Generator()})
    with pytest.raises(C.CheckpointError, match="'w' is on the meta device"):
        C.save_checkpoint(tmp_path, {"w": torch.empty(2, device="meta")}, step=0)
    with pytest.raises(C.CheckpointError, match="state leaf 'x' has type object"):
        C.save_checkpoint(tmp_path, {"x": object()}, step=0)
    assert C.latest_checkpoint(tmp_path) is None


def _save_as_ranks(tmp_path, per_rank_states, step=7):
    """Run save_checkpoint as N ranks in threads sharing a barrier."""
    n = len(per_rank_states)
    barrier = threading.Barrier(n)
    errors = []

    def run(rank):
        try:
            C.save_checkpoint(tmp_path, per_rank_states[rank], step=step, metadata={"world": n},
                              rank=rank, world_size=n, barrier=barrier.wait)
        except Exception as e:  # surfaced in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return tmp_path / f"step_{step:08d}"


def test_sharded_save_merges_blocks_by_offsets(tmp_path):
    full = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16)
    bias = torch.arange(6.0)
    grid = {0: (0, 0), 1: (0, 3), 2: (2, 0), 3: (2, 3)}  # a 2x2 block layout
    states = []
    for r, (i, j) in grid.items():
        states.append({"w": C.LocalShard(full[i:i + 2, j:j + 3], (4, 6), (i, j)),
                       "b": C.LocalShard(bias[j:j + 3], (6,), (j,)),   # replicated over i
                       "count": torch.tensor(5)})                       # replicated: rank 0 writes it
    path = _save_as_ranks(tmp_path, states)
    assert sorted(os.listdir(path)) == [f"rank{r:05d}.msgpack" for r in range(4)]
    state, meta = C.load_checkpoint(path)
    assert torch.equal(state["w"].view(torch.int16), full.view(torch.int16))
    assert torch.equal(state["b"], bias) and meta == {"world": 4, "step": 7}
    assert state["count"].item() == 5

    with pytest.raises(C.CheckpointError, match="load the whole directory"):
        C.load_checkpoint(path / "rank00001.msgpack")
    os.remove(path / "rank00003.msgpack")
    with pytest.raises(C.CheckpointError, match="3 rank files, but the checkpoint was written by 4"):
        C.load_checkpoint(path)


def test_sharded_load_detects_missing_blocks(tmp_path):
    full = torch.arange(8.0)
    states = [{"w": C.LocalShard(full[:4], (8,), (0,))}, {"w": C.LocalShard(full[:4], (8,), (0,))}]
    path = _save_as_ranks(tmp_path, states)
    with pytest.raises(C.CheckpointError, match="cover 4 of 8 elements"):
        C.load_checkpoint(path)


def test_map_location_and_warnings_free_load(tmp_path):
    C.save_checkpoint(tmp_path, {"w": torch.ones(2)}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "non-writable buffer" warning from frombuffer
        state, _ = C.load_checkpoint(tmp_path, map_location="cpu")
    state["w"] += 1  # loaded tensors are ordinary writable tensors
    assert state["w"].device.type == "cpu"


def test_dtensor_leaves_are_written_as_blocks(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already active")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.randn(4, 6)
        state = {"w": distribute_tensor(w, mesh, [Shard(0)]), "b": distribute_tensor(w[0], mesh, [Replicate()])}
        path = C.save_checkpoint(tmp_path / "ck", state, step=1)
    finally:
        dist.destroy_process_group()
    loaded, _ = C.load_checkpoint(path)
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["b"], w[0])


def test_numpy_scalars_in_metadata_become_numbers(tmp_path):
    meta = {"data_position": np.int64(96), "loss": np.float32(1.5), "shape": (2, 3)}
    C.save_checkpoint(tmp_path, {"w": torch.ones(1)}, step=2, metadata=meta)
    assert C.read_metadata(tmp_path) == {"data_position": 96, "loss": 1.5, "shape": [2, 3], "step": 2}
