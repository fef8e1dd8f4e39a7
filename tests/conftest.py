import os

# Must be set before any module defining @triton.jit kernels is imported: on machines without
# a GPU the Triton kernels run under the interpreter on CPU tensors.
if not os.environ.get("FASTLORA_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_float32_matmul():
    """On a GPU (FASTLORA_TEST_GPU=1) the float32 comparisons, some of them bitwise, assume IEEE
    float32 products in torch and in the kernels (which follow torch's TF32 switch): pin TF32
    off for every test, so that a user's setting or another test's cannot leak in."""
    if not os.environ.get("FASTLORA_TEST_GPU"):
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the legacy switch raises once this is used
        before = (torch.backends.fp32_precision, matmul.fp32_precision)
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.fp32_precision, matmul.fp32_precision = before
    else:
        before = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = before
