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
