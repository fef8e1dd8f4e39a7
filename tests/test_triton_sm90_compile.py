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
from fastlora.kernels import lora_grouped_linear as tg

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



COMPILE_LORA_LINEAR = r"""
import json, sys, torch, triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl
from fastlora.kernels import lora_linear as tk

# Run the real launchers on meta tensors of a prefill-sized layer with the kernel replaced by a
# recorder, then compile exactly what they would launch, specialised the way a launch would
# specialise it (dtypes, 16-divisible ints and pointers, ints equal to 1 as constants).
xd, ad = getattr(torch, sys.argv[1]), getattr(torch, sys.argv[2])
if sys.argv[3] == "tf32":  # torch's switch, which the float32 dots follow
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
K, N, p = 4096, 4096, 0.1
names = {"_lora_gemm_kernel": "gemm", "_lora_add_kernel": "add", "_lora_fwd_band_kernel": "fwd_band",
         "_lora_bwd_band_kernel": "bwd_band", "_band_sum_kernel": "band_sum"}
kernels, launches = {short: getattr(tk, name) for name, short in names.items()}, []
class Recorder:
    def __init__(self, name):
        self.name = name
    def __getitem__(self, grid):
        return lambda *args, **kw: launches.append((self.name, args, kw))
for name, short in names.items():
    setattr(tk, name, Recorder(short))
t = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device="meta")
# Ranks up to BAND_MAX_RANK run in the band kernels (several bands at M = 2048: 128-row ones
# at r = 64 in half precision; one band at decode-sized M = 8, whose sums are the gradients
# themselves); above it, or where the bands' partials would outgrow dY, the rank-r GEMMs.
for M, r in ((2048, 16), (2048, 64), (8, 16), (2048, tk.BAND_MAX_RANK), (2048, 256)):
    x, W, gy = t(M, K, dtype=xd), t(N, K, dtype=xd), t(M, N, dtype=xd)
    A, B = t(r, K, dtype=ad), t(N, r, dtype=ad)
    for split in (1, 2):  # split-K writes fp32 partial planes (GPU: the r-sized GEMMs)
        tk._choose_split = lambda tiles, K_, block_k, device: split
        xa = tk.lora_shrink(x, A, p, 1)
        for bias in (None, t(N, dtype=xd), t(N, dtype=ad)):
            tk.lora_forward(x, W, bias, xa, B, 2.0)
            tk.lora_linear_forward(x, W, bias, A, B, 2.0, p, 1)
        tk.lora_backward(gy, x, W, A, B, xa, 2.0, p, 1, True, False, False)

out, seen = {}, set()
for which, args, kw in launches:
    kernel = kernels[which]
    opts = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages")}
    sig, const, attrs = {}, {}, {}
    for i, prm in enumerate(kernel.params):
        v = kw[prm.name] if prm.name in kw else args[i]
        if prm.is_constexpr:
            sig[prm.name], const[prm.name] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not prm.do_not_specialize,
                                          not prm.do_not_specialize_on_alignment)
        if ty == "constexpr":
            sig[prm.name], const[prm.name] = "constexpr", spec
        else:
            sig[prm.name] = ty
            if spec and "D" in spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = json.dumps([which, sig, {k: str(v) for k, v in const.items()}, sorted(attrs), opts])
    if key in seen:
        continue
    seen.add(key)
    if which == "gemm":
        name = " ".join(["gemm", sig["a_ptr"], sig["b_ptr"], "->", sig["c_ptr"]]
                        + [f for f in ("A_TO_F32", "B_TO_F32", "DROP_A", "DROP_B") if const[f]]
                        + [f"dot {const['DOT_PRECISION']}"])
    elif which == "add":
        name = " ".join(["add", sig["c_ptr"], "+=", sig["e_ptr"], sig["f_ptr"]]
                        + (["DROP_LORA"] if const["DROP_LORA"] else [])
                        + ([f"bias {sig['bias_ptr']}"] if const["HAS_BIAS"] else [])
                        + [f"epilogue {const['EPI_PRECISION']}"])
    elif which == "fwd_band":
        name = " ".join(["fwd_band", sig["x_ptr"], sig["a_ptr"], "->", sig["y_ptr"], sig["xa_ptr"]]
                        + [f for f in ("DROP", "HAS_BIAS", "X_TO_F32") if const[f]]
                        + [f"r{const['BLOCK_R']}", f"dot {const['DOT_PRECISION']}"])
    elif which == "bwd_band":
        name = " ".join(["bwd_band", sig["dy_ptr"], sig["a_ptr"], "->", sig["ga_ptr"]]
                        + [f for f in ("DROP", "NEED_DX", "HALF_TO_F32") if const[f]]
                        + [f"r{const['BLOCK_R']}", f"dot {const['DOT_PRECISION']}"])
    else:
        name = " ".join(["band_sum", sig["part_ptr"], "->", sig["ga_ptr"]])
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    out[name] = k.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.parametrize("dtype,adapter_dtype,fp32_precision", [
    ("bfloat16", "bfloat16", "ieee"), ("float32", "float32", "ieee"),
    ("bfloat16", "float32", "ieee"), ("float16", "float32", "tf32")])
def test_lora_linear_launches_compile_for_sm90(dtype, adapter_dtype, fp32_precision):
    # Every kernel the LoRA-linear launchers start (the band kernels and their sum, the rank-r
    # GEMMs and the add kernel of the large ranks; the base products are cuBLAS), with all
    # tensors in one dtype and with PEFT's mixed precision (float32 adapters: upcast operand
    # tiles, a float32 LoRA term added to a half-precision output, IEEE or TF32). The
    # interpreter accepts dtype mixes and shared memory use that a GPU compile may reject.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", COMPILE_LORA_LINEAR, dtype, adapter_dtype, fp32_precision], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    kinds = {config.split()[0] for config in shared}
    assert kinds == {"gemm", "add", "fwd_band", "bwd_band", "band_sum"}, list(shared)
    for config, nbytes in shared.items():
        # (the band sum is elementwise: no shared memory; every other kernel stages dot tiles)
        low = 0 if config.startswith("band_sum") else 1
        assert low <= nbytes <= SM90_MAX_SHARED, f"{config}: {nbytes} bytes of shared memory on sm_90"
    print(json.dumps(shared, indent=1))


COMPILE_QLORA = r"""
import json, sys, torch, triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl
from fastlora.kernels import lora_quantized_linear as tk

# As COMPILE_LORA_LINEAR: the real QLoRA launchers on meta tensors of a prefill-sized and a
# decode-sized layer, the kernel replaced by a recorder, then every distinct launch compiled for
# sm_90 with the specialisation a launch would get (argv: x dtype, adapter dtype, float32 dot
# precision, format, the layer's row counts).
xd, ad, fmt = getattr(torch, sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[4]
rows = [int(m) for m in sys.argv[5].split(",")]
if sys.argv[3] == "tf32":
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
K, N, r, p = 4096, 4096, 64, 0.1
# nf4: 4-bit codes, blocks of 64 (a shift); int8: per-row scales (blocksize K, a shift); u8:
# 8-bit codes in blocks of 100 (an integer division).
blocksize = {"nf4": 64, "int8": K, "u8": 100}[fmt]
t = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device="meta")
code = t(16 if fmt == "nf4" else 256, dtype=torch.float32)  # the code book: its length picks 4 or 8 bits
nbytes = N * K // 2 if fmt == "nf4" else N * K
kernel, launches = tk._qlora_gemm_kernel, []
class Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kw: launches.append((grid, args, kw))
tk._qlora_gemm_kernel = Recorder()
qa = (t(nbytes, dtype=torch.uint8), t(-(-N * K // blocksize), dtype=torch.float32), code, blocksize, [N, K])
A, B = t(r, K, dtype=ad), t(N, r, dtype=ad)
for M in rows:
    x, gy = t(M, K, dtype=xd), t(M, N, dtype=xd)
    for split in (1, 2):  # split-K writes float32 partial planes (GPU: the r-sized GEMMs)
        tk._choose_split = lambda tiles, K_, block_k, device: split
        for bias, bb in ((None, None), (t(N, dtype=xd), t(N, dtype=ad))):
            _, xa = tk.lora_quantized_forward(x, *qa, bias, A, B, 2.0, p, 1, bb)
        tk.lora_quantized_backward(gy, x, *qa, A, B, xa, 2.0, p, 1, True, True)
if fmt == "int8":  # the int64 flat indices of weights with >= 2**31 elements
    tk._FLAT32_LIMIT = 0
    _, xa = tk.lora_quantized_forward(x, *qa, None, A, B, 2.0, p, 1)
    tk.lora_quantized_backward(gy, x, *qa, A, B, xa, 2.0, p, 1, True, False)

out, seen = {}, set()
for grid, args, kw in launches:
    opts = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages")}
    sig, const, attrs = {}, {}, {}
    for i, prm in enumerate(kernel.params):
        v = kw[prm.name] if prm.name in kw else args[i]
        if prm.is_constexpr:
            sig[prm.name], const[prm.name] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not prm.do_not_specialize,
                                          not prm.do_not_specialize_on_alignment)
        if ty == "constexpr":
            sig[prm.name], const[prm.name] = "constexpr", spec
        else:
            sig[prm.name] = ty
            if spec and "D" in spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = json.dumps([sig, {k: str(v) for k, v in const.items()}, sorted(attrs), opts, grid[1] > 1])
    if key in seen:
        continue
    seen.add(key)
    name = " ".join([sig["a_ptr"], sig["b_ptr"], "->", sig["c_ptr"]]
                    + [f"{const['BLOCK_M']}x{const['BLOCK_N']}x{const['BLOCK_K']}"]
                    + [f for f in ("QUANT_B", "HALF_BASE", "FOUR_BIT", "FLAT64", "DROP_A", "DROP_B", "DROP_LORA",
                                   "HAS_BIAS", "HAS_LORA") if const[f]]
                    + ([f"shift {const['BS_SHIFT']}"] if const["QUANT_B"] else [])
                    + [f"dot {const['DOT_PRECISION']}"]
                    + ([f"epilogue {const['EPI_PRECISION']}"] if const["HAS_LORA"] else []) + [f"split {grid[1]}"])
    name += f" #{len(out)}" if name in out else ""
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    out[name] = k.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.parametrize("dtype,adapter_dtype,fp32_precision,fmt,rows", [
    ("bfloat16", "float32", "ieee", "nf4", "2048,16"), ("float32", "float32", "tf32", "int8", "2048"),
    ("float16", "float16", "ieee", "u8", "2048"), ("bfloat16", "bfloat16", "tf32", "u8", "2048")])
def test_lora_quantized_linear_launches_compile_for_sm90(dtype, adapter_dtype, fp32_precision, fmt, rows):
    # Every GEMM the QLoRA launchers start (the dequantizing base GEMMs of the forward and of
    # grad_x, and the rank-sized ones), for 4-bit and 8-bit codes, a shift and a division for the
    # block index, IEEE and TF32 float32 dots, split-K planes, prefill-sized tiles (and decode-sized
    # ones once: 16 rows); each within sm_90's shared memory. A float16 / bfloat16 x runs the
    # dequantizing GEMMs' main loop in its own dtype (HALF_BASE: W tiles rounded to it, half
    # tensor-core dots) under a float32 LoRA epilogue (IEEE or TF32): those must fit twice on an
    # SM. Measured (triton 3.9, 128x128x32 tiles, 8 warps, 3 stages; 16x128x32 at 16 rows):
    #   bf16 x, nf4, fp32 adapters       96 KiB (72 KiB at 16 rows)
    #   fp16 x, u8 (8-bit, division)     64 KiB
    #   bf16 x, u8, bf16 adapters, TF32  80 KiB
    #   fp32 x (float32 main loop)       96 KiB (TF32, int8)
    #   rank-sized float32 GEMMs      16-48 KiB
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", COMPILE_QLORA, dtype, adapter_dtype, fp32_precision, fmt, rows],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    base = [config for config in shared if "QUANT_B" in config]
    assert base
    half = dtype != "float32"
    assert all(("HALF_BASE" in config) == half for config in base), base
    assert all(f"epilogue {fp32_precision}" in config for config in base if "HAS_LORA" in config), base
    for config, nbytes in shared.items():
        limit = SM90_MAX_SHARED // 2 if "HALF_BASE" in config else SM90_MAX_SHARED
        assert 0 < nbytes <= limit, f"{config}: {nbytes} bytes of shared memory on sm_90 (limit {limit})"


COMPILE_DEQUANTIZE = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlora.kernels import lora_quantized_linear as tk

out = {}
for ty in ("fp32", "bf16", "fp16", "fp64"):
    for four_bit, shift, flat64 in ((True, 6, False), (False, -1, False), (True, 6, True)):
        sig = {"q_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*" + ty, "N": "i32",
               "K": "i32", "blocksize": "i32", **{c: "constexpr" for c in (
                   "FOUR_BIT", "BS_SHIFT", "FLAT64", "BLOCK_R", "BLOCK_C", "INTERPRET")}}
        const = {"FOUR_BIT": four_bit, "BS_SHIFT": shift, "FLAT64": flat64, "BLOCK_R": 32, "BLOCK_C": 128,
                 "INTERPRET": False}
        k = triton.compile(ASTSource(fn=tk._dequantize_kernel, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        out[f"{ty} four_bit={four_bit} shift={shift} flat64={flat64}"] = k.metadata.shared
print(json.dumps(out))
"""


def test_dequantize_kernel_compiles_for_sm90():
    # fastlora::dequantize's GPU kernel for every output dtype, 4-bit / 8-bit codes, a shift and
    # a division for the block index, int32 and int64 flat indices (the launcher's 32 x 128 tile).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_DEQUANTIZE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(shared) == 12 and all(nbytes <= SM90_MAX_SHARED for nbytes in shared.values()), shared


CHECK_UNSPECIALISED = r"""
from fastlora.kernels import lora_linear as tk, lora_quantized_linear as tq
for kernel in (tk._lora_fwd_band_kernel, tk._lora_bwd_band_kernel, tk._lora_gemm_kernel, tk._lora_add_kernel,
               tq._qlora_gemm_kernel):
    params = {p.name: p for p in kernel.params}
    assert params["M"].do_not_specialize, kernel.fn.__name__
print("ok")
"""


def test_row_count_is_not_specialised():
    # A launch specialises an int argument on divisibility by 16 and on == 1; the token count M
    # is not specialised, so variable sequence lengths reuse one compiled kernel. (Checked on
    # the JIT functions, which exist without the interpreter.)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", CHECK_UNSPECIALISED], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
