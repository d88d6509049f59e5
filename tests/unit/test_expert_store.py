"""The expert store reads exactly the bytes mlx-lm loads, for every dtype, by positional reads."""

from __future__ import annotations

import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load

from helpers import build_model
from mlx_flash.experts.store import MAX_READ, ExpertStore, read_index


def expert_names(model: nn.Module) -> list[str]:
    """The parameters of the model's SwitchGLU layers, as saved."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, SwitchGLU):
            names += [f"{path}.{k}" for k, _ in tree_flatten(module.parameters())]
    return names


@pytest.mark.parametrize("quantized", [False, True])
def test_reads_each_expert_as_mlx_lm_loads_it(tmp_path: Path, quantized: bool) -> None:
    path = build_model("qwen3_moe", tmp_path / "moe")
    model, _ = load(str(path))
    if quantized:  # 4-bit weights with bf16 scales and biases, as mlx-community checkpoints hold them
        model.set_dtype(mx.bfloat16)
        nn.quantize(model, group_size=32, bits=4)
        mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    names = expert_names(model)
    params = dict(tree_flatten(model.parameters()))
    assert names and (not quantized or any(params[n].dtype == mx.bfloat16 for n in names))
    with ExpertStore(path, names) as store:
        read = store.read(names, [5, 0, 7])
        for name in names:
            got, want = read[name], params[name][mx.array([5, 0, 7])]
            assert got.dtype == want.dtype and got.shape == want.shape
            assert mx.array_equal(got, want).item(), name
        assert store.bytes_read == 3 * store.expert_bytes()
        # Same-shaped tensors of one read get their own buffers; layers read one by one share them.
        store._staging.clear()
        layers = sorted({n.split(".mlp.")[0] for n in names})
        for layer in layers:
            store.read([n for n in names if n.startswith(layer + ".")], [1])
        assert len(layers) > 1 and len(store._staging) == len(names) // len(layers)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32, mx.uint32, mx.uint8])
def test_every_dtype_keeps_its_bits(tmp_path: Path, dtype: mx.Dtype) -> None:
    x = (mx.random.normal((4, 3, 8)) * 1000).astype(dtype)
    mx.save_safetensors(str(tmp_path / "a.safetensors"), {"experts.w": x})
    with ExpertStore(tmp_path, ["experts.w"]) as store:
        assert mx.array_equal(store.read(["experts.w"], [3, 1])["experts.w"], x[mx.array([3, 1])]).item()


def test_an_expert_larger_than_one_read_is_split_and_reassembled(tmp_path: Path) -> None:
    x = mx.random.normal((2, MAX_READ // 4 + 17))  # float32: one expert spans two reads
    mx.save_safetensors(str(tmp_path / "a.safetensors"), {"w": x})
    with ExpertStore(tmp_path, ["w"]) as store:
        assert mx.array_equal(store.read(["w"], [1, 0])["w"], x[mx.array([1, 0])]).item()


def test_bad_files_and_names_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="too short"):
        read_index(tmp_path / "short.safetensors")
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="past the end"):
        read_index(tmp_path / "short.safetensors")
    for header, says in ((b"{not json", "header is not JSON"), (b'{"w": 3}', "not a safetensors header")):
        (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(ValueError, match=f"short.safetensors: .*{says}"):
            read_index(tmp_path / "short.safetensors")
    (tmp_path / "short.safetensors").unlink()
    mx.save_safetensors(str(tmp_path / "a.safetensors"), {"w": mx.zeros((3, 2)), "s": mx.zeros(())})
    with pytest.raises(KeyError, match="nope"):
        ExpertStore(tmp_path, ["nope"])
    with pytest.raises(ValueError, match="not stacked"):
        ExpertStore(tmp_path, ["s"])
    with ExpertStore(tmp_path, ["w"]) as store:
        with pytest.raises(IndexError, match="3 experts"):
            store.read(["w"], [3])
