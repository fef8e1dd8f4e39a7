"""Every registered kernel op of the sparsify, aggregate and low-rank families, called raw
(torch.ops.fastlora.*, not through the Python wrappers) with mismatched shapes or out-of-range
arguments: a ValueError naming the problem before any memory is touched, never a read past a
tensor's end. (The LoRA families' raw ops are covered in tests/test_lora_linear.py and
tests/test_lora_grouped_linear.py; `make test-cpp-sanitize` runs the C++ tests under
AddressSanitizer + UndefinedBehaviorSanitizer.)"""
import pytest
import torch

import fastlora  # noqa: F401  (registers the ops)

ops = torch.ops.fastlora
B, A, W1 = [torch.randn(8, 2)], [torch.randn(2, 6)], torch.tensor([1.0])

CASES = {
    "sparse_aggregate_ values vs indices": (
        lambda: ops.sparse_aggregate_([torch.zeros(10)], [torch.tensor([1, 2, 3])], [torch.tensor([1.0])], W1, False),
        "as many entries as indices"),
    "sparse_aggregate_ weights": (
        lambda: ops.sparse_aggregate_([torch.zeros(10)], [torch.tensor([1])], [torch.tensor([1.0])],
                                      torch.tensor([1.0, 2.0]), False),
        "one entry per client"),
    "sparse_aggregate_ index out of range, validate=False": (
        lambda: ops.sparse_aggregate_([torch.zeros(10)], [torch.tensor([100])], [torch.tensor([1.0])], W1, False),
        "out of range"),
    "sparse_aggregate_ list lengths": (
        lambda: ops.sparse_aggregate_([torch.zeros(10)], [torch.tensor([1]), torch.tensor([2])], [torch.tensor([1.0])],
                                      torch.tensor([1.0, 1.0]), False),
        "2 index tensors but 1 value tensors"),
    "topk_sparsify residual shape": (
        lambda: ops.topk_sparsify([torch.randn(10)], [torch.zeros(5)], 3, False, torch.float32),
        "residual\\[0\\] has 5 elements"),
    "topk_sparsify residual count": (
        lambda: ops.topk_sparsify([torch.randn(10), torch.randn(4)], [torch.zeros(10)], 3, False, torch.float32),
        "match deltas one to one"),
    "svd_factored rank": (lambda: ops.svd_factored([torch.randn(8, 3)], A, W1), "B's columns must equal A's rows"),
    "svd_factored products": (
        lambda: ops.svd_factored([B[0], torch.randn(7, 2)], [A[0], A[0]], torch.tensor([1.0, 1.0])),
        "product is 7 x 6"),
    "svd_factored weights": (lambda: ops.svd_factored(B, A, torch.tensor([1.0, 2.0])), "one entry per product"),
    "svd_factored list lengths": (lambda: ops.svd_factored(B + B, A, torch.tensor([1.0, 1.0])), "2 B factors but 1 A"),
    "lowrank_truncate rank": (lambda: ops.lowrank_truncate(B, A, W1, 100), "rank must be in \\[1, min"),
    "lowrank_truncate negative rank": (lambda: ops.lowrank_truncate(B, A, W1, -1), "rank must be in \\[1, min"),
    "rsvd omega": (lambda: ops.rsvd(torch.randn(10, 8), torch.randn(3, 4), 2, 1, None), "omega must be"),
    "rsvd rank": (lambda: ops.rsvd(torch.randn(10, 8), torch.randn(8, 4), 20, 1, None), "rank must be in"),
    "rsvd_implicit sparse index": (
        lambda: ops.rsvd_implicit(B, A, W1, torch.tensor([100]), torch.tensor([1.0]), torch.randn(6, 4), 8, 2, 1),
        "sparse index out of range"),
    "rsvd_implicit operator rows": (
        lambda: ops.rsvd_implicit(B, A, W1, torch.tensor([1]), torch.tensor([1.0]), torch.randn(6, 4), 5, 2, 1),
        "the operator is 5 x 6"),
    "rsvd_implicit omega": (
        lambda: ops.rsvd_implicit(B, A, W1, torch.tensor([1]), torch.tensor([1.0]), torch.randn(3, 4), 8, 2, 1),
        "the operator is 8 x 3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_raw_op_rejects_mismatched_arguments(case):
    call, match = CASES[case]
    with pytest.raises(ValueError, match=match):
        call()
