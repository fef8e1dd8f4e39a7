"""Triton grouped LoRA (SGMV shrink / expand) vs fastlora.reference, under the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1. Same tolerance rule as the other kernel tests: at
most twice the reference's own error in the test dtype (vs float64) plus a few ulps.
"""
import importlib
import os

import pytest
import torch

from fastlora import reference as ref
from fastlora.kernels import lora_grouped_linear as tg
from tolerance import assert_close_to_truth

from test_lora_grouped_linear import ARG_ORDER, FLOAT_KEYS, make_inputs
lora_ops = importlib.import_module("fastlora.ops.lora_grouped_linear")  # the module, not the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if os.environ.get("FASTLORA_TEST_GPU") else "cpu"
# (rows, in, out, ranks, row pattern): small shapes (the interpreter costs ms per program).
CASES = [
    (1, 6, 42, [4], "all0"),
    (42, 123, 43, [1, 8, 20], "interleaved"),
    (37, 42, 6, [8, 8], "base"),
    (50, 42, 17, [4, 0, 8, 2], "sparse"),
    (0, 16, 8, [4, 8], "random"),
]


def on_device(t, dtype, layout="contig"):
    out = {k: (v.to(dtype) if k in FLOAT_KEYS and v is not None else v) for k, v in t.items()}
    out = {k: (v.to(DEVICE) if v is not None else None) for k, v in out.items()}
    if layout == "strided":  # x as every other column of a wider tensor
        x = out["x"]
        out["x"] = torch.zeros(x.shape[0], 2 * x.shape[1] + 1, dtype=dtype, device=DEVICE)[:, 1::2].copy_(x)
    elif layout == "transposed":
        out["x"] = out["x"].t().contiguous().t()
    return [out[k] for k in ARG_ORDER]


def check(dtype, case, layout="contig", fn=None):
    t = make_inputs(*case)
    truth = ref.lora_grouped_linear(*on_device(t, torch.float64))
    ref_y = ref.lora_grouped_linear(*on_device(t, dtype))
    y = (fn or tg.grouped_forward)(*on_device(t, dtype, layout))
    assert y.dtype == dtype and not y.isnan().any(), "the padding (NaN) must never be read"
    assert_close_to_truth(y, ref_y, truth, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grouped_forward(dtype, case):
    check(dtype, case)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_noncontiguous_x(layout):
    check(torch.float16, (33, 40, 24, [8, 3], "random"), layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_tiles(dtype, monkeypatch):
    # GPU-style tiling under the interpreter: 16-row tiles (several per adapter, ragged last
    # tile), 16-wide K loop with many trips and several N tiles.
    # 16-wide rank chunks: the rank-40 adapter takes three (the last ragged), the others one.
    monkeypatch.setattr(tg, "_block_m_cap", lambda: 16)
    monkeypatch.setattr(tg, "_blocks", lambda max_rows, K, N, r_max, dtype: (16, 16, 16, 16, 4))
    check(dtype, (70, 45, 40, [5, 40, 2], "random"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_1024_in_chunks(dtype):
    """A rank-1024 adapter next to a rank-3 one, with the kernel's own rank chunks (128 wide,
    64 in float32): no tile ever holds the whole rank, which on a GPU overflowed shared memory."""
    assert tg._blocks(16, 32, 32, 1024, dtype)[3] == (64 if dtype == torch.float32 else 128)
    check(dtype, (24, 32, 24, [1024, 3], "random"))


def test_tile_table():
    ra = torch.tensor([1, -1, 0, 1, 1, 3, -1, 1, 0])
    perm, tiles, block_m = tg.tile_table(ra, torch.tensor([4, 2, 8, 0]), block_m_cap=16)
    assert block_m == 16
    assert perm.tolist() == [1, 6, 2, 8, 0, 3, 4, 7, 5]  # stable, base rows first
    # adapter 2 is absent, adapter 3 has rank 0: no tiles for them.
    assert tiles.tolist() == [[0, 2, 4], [1, 4, 8]]
    _, tiles, _ = tg.tile_table(torch.zeros(40, dtype=torch.int64), torch.tensor([4]), block_m_cap=16)
    assert tiles.tolist() == [[0, 0, 16], [0, 16, 32], [0, 32, 40]]  # tiles never exceed block_m


def test_rejects_float64():
    t = on_device(make_inputs(4, 8, 6, [2], "all0"), torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tg.grouped_forward(*t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cuda_dispatch_glue(dtype):
    # The function registered for CUDA (fastlora/ops/lora_grouped_linear.py) on CPU tensors through the
    # interpreter: value checks, then Triton (float64: the reference).
    check(dtype, (42, 24, 20, [4, 8, 2], "random"), fn=lora_ops._grouped_cuda)
    t = on_device(make_inputs(6, 8, 5, [2, 3], "random"), dtype)
    t[ARG_ORDER.index("row_adapter")] = torch.tensor([0, 1, 2, 0, 0, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"row_adapter\[2\] = 2 is out of range"):
        lora_ops._grouped_cuda(*t)
