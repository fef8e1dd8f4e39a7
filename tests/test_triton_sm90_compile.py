"""Compile-only checks of Triton kernels for a Hopper GPU (sm_90), without a GPU: Triton
compiles to PTX and cubin on any machine (its ptxas ships in the wheel), and the resource report
says what a launch would need. Run in a subprocess without TRITON_INTERPRET (the interpreter,
which the rest of the suite uses, compiles nothing)."""
import json
import os
import subprocess
import sys

import pytest

# Shared memory per block on an H100/H200 (227 KB usable of 228 KB).
SM90_MAX_SHARED = 227 * 1024

COMPILE_GROUPED = r'''
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlora.kernels import lora_grouped as tg

dtype_name, r_max = sys.argv[1], int(sys.argv[2])
import torch
dtype = getattr(torch, dtype_name)
ty = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]
# the launcher's own tile choice for a prefill-sized group of this rank
bm, bk, bn, br, num_warps = tg._blocks(64, 4096, 4096, r_max, dtype)
prec = "ieee"
common = {"perm_ptr": "*i64", "tiles_ptr": "*i32", "ranks_ptr": "*i32"}
shrink = ASTSource(fn=tg._sgmv_shrink_kernel, signature={
    "x_ptr": "*" + ty, "a_ptr": "*" + ty, "xa_ptr": "*" + ty, **common, "K": "i32",
    **{s: "i32" for s in ("stride_xm", "stride_xk", "stride_aa", "stride_ar", "stride_ak", "stride_xam", "stride_xar")},
    "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr", "DOT_PRECISION": "constexpr",
    "INTERPRET": "constexpr"},
    constexprs={"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": br, "DOT_PRECISION": prec, "INTERPRET": False})
expand = ASTSource(fn=tg._sgmv_expand_kernel, signature={
    "xa_ptr": "*" + ty, "b_ptr": "*" + ty, "y_ptr": "*" + ty, **common, "scal_ptr": "*fp32", "N": "i32",
    **{s: "i32" for s in ("stride_xam", "stride_xar", "stride_ba", "stride_bn", "stride_br", "stride_ym", "stride_yn")},
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr", "DOT_PRECISION": "constexpr",
    "INTERPRET": "constexpr"},
    constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br, "DOT_PRECISION": prec, "INTERPRET": False})
out = {}
for name, src, stages in (("shrink", shrink, 3), ("expand", expand, 2)):
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": stages})
    out[name] = k.metadata.shared
print(json.dumps(out))
'''


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_grouped_lora_fits_sm90_shared_memory_at_rank_1024(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", COMPILE_GROUPED, dtype, "1024"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    for kernel, nbytes in shared.items():
        assert 0 < nbytes <= SM90_MAX_SHARED, f"{kernel}: {nbytes} bytes of shared memory on sm_90"
