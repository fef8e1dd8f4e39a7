import pytest
import torch

from fastlora import codec
from fastlora.sparse_delta import Layout, SparseDelta
from fastlora.staleness import StaleUpdates


def rand_delta(layout, nnz):
    idx = torch.sort(torch.randperm(layout.numel)[:nnz]).values
    return SparseDelta(idx, torch.randn(nnz), layout)


def dense(sd):
    return sd.to_dense(torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_formula_over_rounds(beta):
    layout = Layout.of(torch.zeros(500))
    n = 6
    st = StaleUpdates(layout, n, beta=beta)
    memory = {}
    for rnd, participants in enumerate([[0, 1, 2], [2, 3], [0, 4, 5], [1]]):
        fresh = {i: rand_delta(layout, 40) for i in participants}
        w = {i: 1.0 / len(participants) for i in participants}
        got = st.aggregate(fresh).double()
        expected = sum(w[i] * (dense(fresh[i]) - beta * (dense(memory[i]) if i in memory else 0)) for i in participants)
        expected = expected + beta * sum(dense(h) / n for h in memory.values())
        assert torch.allclose(got, expected, atol=1e-5)
        memory.update(fresh)
        assert set(st.memory) == set(memory)


def test_beta_zero_is_fedavg_over_participants_and_accepts_payloads():
    layout = Layout.of({"a": torch.zeros(10, 10), "b": torch.zeros(7)})
    st = StaleUpdates(layout, 3, beta=0.0)
    fresh = {2: rand_delta(layout, 20), 0: rand_delta(layout, 30)}
    payloads = {i: codec.encode(d, values="fp32", layout="fingerprint") for i, d in fresh.items()}
    got = st.aggregate(payloads, weights={0: 0.25, 2: 0.75})
    for k in got:
        expected = 0.25 * fresh[0].to_dense()[k] + 0.75 * fresh[2].to_dense()[k]
        assert torch.allclose(got[k], expected)


def test_errors():
    layout = Layout.of(torch.zeros(10))
    with pytest.raises(ValueError, match="beta"):
        StaleUpdates(layout, 3, beta=1.5)
    st = StaleUpdates(layout, 3)
    with pytest.raises(ValueError, match="client id 5"):
        st.aggregate({5: rand_delta(layout, 2)})
    with pytest.raises(ValueError, match="client 1: cannot decode"):
        st.aggregate({1: b"garbage"})
    with pytest.raises(ValueError, match="client 0: layout differs"):
        st.aggregate({0: rand_delta(Layout.of(torch.zeros(11)), 2)})
