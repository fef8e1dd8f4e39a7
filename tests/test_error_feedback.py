"""fastlora.ErrorFeedback: the raw-API client step (top-k + travel rounding + encode) with the
residual keeping everything the payload does not carry, bitwise; state across rounds; numpy;
errors that change nothing; and the loop's sparsify_encode running the same core."""
import warnings

import numpy as np
import pytest
import torch

import fastlora
from fastlora import ErrorFeedback, Layout, codec
from fastlora.fl.client import sparsify_encode

FORMATS = ["fp32", "fp16", "bf16", "int8"]


def _delta(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"q.lora_A": scale * torch.randn(8, 37, generator=g),
            "q.lora_B": 1e-3 * scale * torch.randn(37, 8, generator=g),
            "head": scale * torch.randn(5, generator=g)}


def _bits(t):
    return t.view(torch.int32)


def _clone(d):
    return {n: t.clone() for n, t in d.items()}


def _assert_exact(payload, layout, delta, old, new):
    """decoded + residual_new == float32(delta) + residual_old, bitwise, in float32."""
    dec = codec.decode(payload, layout=layout).to_dense(torch.float32)
    dec = dec if layout.is_dict else {"": dec}
    for n in layout.names:
        lhs = dec[n] + new[n]
        rhs = delta[n].to(torch.float32) + old[n]
        assert torch.equal(_bits(lhs), _bits(rhs)), n


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
@pytest.mark.parametrize("values", FORMATS)
def test_decoded_plus_residual_is_delta_plus_old_residual(values, per_tensor):
    layout = Layout.of(_delta())
    ef = ErrorFeedback(layout, density=0.2, values=values, per_tensor=per_tensor)
    ef.residual["head"] += 0.05
    for rnd in range(3):                          # the residual carries over rounds
        delta = _delta(seed=rnd)
        old = _clone(ef.residual)
        payload = ef.encode(delta)
        assert isinstance(payload, bytes)
        info = codec.inspect(payload, layout=layout)
        assert info["values"] == values and info["layout_mode"] == "fingerprint"
        _assert_exact(payload, layout, delta, old, ef.residual)
        if values != "fp32":   # the rounding really went somewhere: kept entries' residual is not all 0
            sd = codec.decode(payload, layout=layout)
            kept = torch.cat([ef.residual[n].reshape(-1)[i] for n, (i, _) in sd.split().items()])
            assert bool((kept != 0).any())


@pytest.mark.parametrize("values", FORMATS)
def test_single_tensor_and_other_delta_dtypes(values):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        delta = torch.randn(50, 3, generator=g).to(dtype)
        ef = ErrorFeedback(k=20, values=values)            # layout from the first delta
        payload = ef.encode(delta)
        assert ef.layout == Layout.of(delta) and not ef.layout.is_dict
        _assert_exact(payload, ef.layout, {"": delta}, {"": torch.zeros(50, 3)}, {"": ef.residual})
        assert codec.decode(payload, layout=ef.layout).nnz == 20


def test_overflow_clamp_keeps_the_excess_in_the_residual():
    # 7e4 (just above fp16), 2**29 + 2**16 + 64 (where v - 65504 would round in float32),
    # 1e12 (nothing fits: sent as 0) and their negatives
    big = [7e4, -1e6, 2.0 ** 29 + 2.0 ** 16 + 64, -(2.0 ** 29 + 2.0 ** 16 + 64), 1e12, -3.4e38]
    delta = {"a": torch.tensor(big + [1.0, -0.5]), "b": torch.tensor([1e-3, 2.0])}
    layout = Layout.of(delta)
    for values in ("fp16", "bf16"):
        ef = ErrorFeedback(layout, k=8, values=values)
        payload = ef.encode(delta)
        _assert_exact(payload, layout, delta, {n: torch.zeros_like(t) for n, t in delta.items()}, ef.residual)
        sent = codec.decode(payload, layout=layout).to_dense(torch.float32)["a"]
        assert all(bool(torch.isfinite(r).all()) for r in ef.residual.values())
        if values == "fp16":
            assert sent[0] == 65504 and sent[1] == -65504 and sent[2] == 65472 and sent[3] == -65472
            assert sent[4] == 0 and ef.residual["a"][4] == 1e12
            assert ef.residual["a"][0] == 7e4 - 65504
        else:
            assert sent[5] == -torch.finfo(torch.bfloat16).max
        # the next round sends more of the excess: nothing is lost, only delayed
        old = _clone(ef.residual)
        zero = {n: torch.zeros_like(t) for n, t in delta.items()}
        _assert_exact(ef.encode(zero), layout, zero, old, ef.residual)


def test_overflow_raise_changes_nothing():
    delta = {"a": torch.tensor([7e4, 1.0, 2.0]), "b": torch.tensor([0.5])}
    ef = ErrorFeedback(Layout.of(delta), k=2, values="fp16", overflow="raise")
    ef.residual["b"] += 0.25
    before = _clone(ef.residual)
    with pytest.raises(ValueError, match="ErrorFeedback.encode: .*70000.*overflows torch.float16"):
        ef.encode(delta)
    assert all(torch.equal(before[n], ef.residual[n]) for n in before)


def test_clamp_and_raise_agree_when_nothing_overflows_and_match_sparsify_encode():
    """One implementation: the loop's sparsify_encode, ErrorFeedback in either overflow mode,
    the same bytes and the same residual bits."""
    layout = Layout.of(_delta())
    for values in FORMATS:
        for per_tensor in (False, True):
            efs = [ErrorFeedback(layout, density=0.1, values=values, per_tensor=per_tensor, overflow=o)
                   for o in ("clamp", "raise")]
            res = fastlora.new_residual(_delta())
            for rnd in range(2):
                delta = _delta(seed=10 + rnd)
                p = [ef.encode(delta) for ef in efs]
                p.append(sparsify_encode(delta, layout, density=0.1, values=values, residual=res, per_tensor=per_tensor))
                assert p[0] == p[1] == p[2], (values, per_tensor)
                for n in res:
                    assert torch.equal(_bits(efs[0].residual[n]), _bits(efs[1].residual[n]))
                    assert torch.equal(_bits(efs[0].residual[n]), _bits(res[n]))


def test_k_and_density_overrides_and_defaults():
    layout = Layout.of(_delta())
    ef = ErrorFeedback(layout)
    assert ef.values == "fp16" and ef.overflow == "clamp"      # fp16 uploads, as fastlora.fl's strategies
    with pytest.raises(ValueError, match="no budget"):
        ef.encode(_delta())
    assert codec.decode(ef.encode(_delta(), k=7), layout=layout).nnz == 7
    assert codec.decode(ef.encode(_delta(), density=0.5), layout=layout).nnz == int(0.5 * layout.numel + 0.5)
    ef = ErrorFeedback(layout, density=1.0, values="fp32")
    payload = ef.encode(_delta())
    assert codec.decode(payload, layout=layout).nnz == layout.numel
    assert all(bool((r == 0).all()) for r in ef.residual.values())   # fp32, everything sent: nothing left


def test_state_dict_round_trip_continues_bitwise():
    layout = Layout.of(_delta())
    a = ErrorFeedback(layout, density=0.1, values="int8")
    a.encode(_delta(seed=1))
    for as_numpy in (False, True):
        state = a.state_dict(as_numpy=as_numpy)
        assert list(state) == list(layout.names)
        assert all(isinstance(v, np.ndarray if as_numpy else torch.Tensor) for v in state.values())
        assert all(v.dtype == (np.float32 if as_numpy else torch.float32) for v in state.values())
        b = ErrorFeedback(layout, density=0.1, values="int8")
        b.load_state_dict(state)
        next_a = ErrorFeedback(layout, density=0.1, values="int8")
        next_a.load_state_dict(a.state_dict())
        assert b.encode(_delta(seed=2)) == next_a.encode(_delta(seed=2))
        assert all(torch.equal(b.residual[n], next_a.residual[n]) for n in layout.names)
    # a copy: changing the state dict does not change the object, and back
    state = a.state_dict()
    state["head"] += 1.0
    assert not torch.equal(state["head"], a.residual["head"])
    # empty state: zero residual
    a.load_state_dict({})
    assert all(bool((r == 0).all()) for r in a.residual.values())
    assert ErrorFeedback(density=0.1).state_dict() == {}


def test_state_dict_through_flower_arrayrecord():
    flwr_app = pytest.importorskip("flwr.app")
    layout = Layout.of(_delta())
    a = ErrorFeedback(layout, density=0.1)
    a.encode(_delta(seed=3))
    record = flwr_app.ArrayRecord(a.state_dict())            # what a ClientApp keeps in context.state
    b = ErrorFeedback(layout, density=0.1)
    b.load_state_dict(record)
    assert all(torch.equal(a.residual[n], b.residual[n]) for n in layout.names)
    assert a.encode(_delta(seed=4)) == b.encode(_delta(seed=4))


def test_load_state_dict_errors_keep_the_residual():
    layout = Layout.of(_delta())
    ef = ErrorFeedback(layout, density=0.1)
    ef.encode(_delta())
    before = _clone(ef.residual)
    good = ef.state_dict()
    bad_cases = {
        "missing": ({k: v for k, v in good.items() if k != "head"}, ValueError, "missing \\['head'\\]"),
        "shape": ({**good, "head": torch.zeros(6)}, ValueError, "'head' has shape"),
        "dtype": ({**good, "head": good["head"].double()}, TypeError, "float32"),
        "numpy dtype": ({**good, "head": good["head"].numpy().astype(np.float16)}, TypeError, "float32"),
        "nan": ({**good, "q.lora_A": torch.full((8, 37), float("nan"))}, ValueError, "NaN"),
        "kind": ({**good, "head": [0.0] * 5}, TypeError, "list"),
    }
    for name, (state, exc, match) in bad_cases.items():
        with pytest.raises(exc, match=match):
            ef.load_state_dict(state)
        assert all(torch.equal(before[n], ef.residual[n]) for n in before), name
    with pytest.raises(TypeError, match="dict"):
        ef.load_state_dict([1, 2])


def test_lazy_layout_and_loaded_state_before_first_encode():
    a = ErrorFeedback(density=0.2)
    assert a.layout is None and a.residual is None
    a.encode(_delta())
    b = ErrorFeedback(density=0.2)
    b.load_state_dict(a.state_dict())                          # no layout yet: taken from the state
    assert b.encode(_delta(seed=1)) == a.encode(_delta(seed=1))
    c = ErrorFeedback(density=0.2)
    c.load_state_dict({"other": torch.zeros(3)})
    with pytest.raises(ValueError, match="differ from the loaded residual"):
        c.encode(_delta())
    assert c.layout is None and list(c.residual) == ["other"]


def test_numpy_delta_gives_the_same_bytes():
    delta = _delta(seed=5)
    layout = Layout.of(delta)
    ref = ErrorFeedback(layout, density=0.1)
    expected = ref.encode(delta)
    ro = {n: t.numpy().copy() for n, t in delta.items()}
    for a in ro.values():
        a.flags.writeable = False
    forms = {
        "numpy": {n: t.numpy().copy() for n, t in delta.items()},
        "read-only": ro,
        "big-endian": {n: t.numpy().astype(">f4") for n, t in delta.items()},
        "fortran": {n: np.asfortranarray(t.numpy()) for n, t in delta.items()},
        "float64": {n: t.numpy().astype(np.float64) for n, t in delta.items()},
        "mixed": {"q.lora_A": delta["q.lora_A"], "q.lora_B": delta["q.lora_B"].numpy(), "head": delta["head"]},
    }
    for name, d in forms.items():
        snapshot = {n: (v.numpy() if isinstance(v, torch.Tensor) else v).copy() for n, v in d.items()}
        ef = ErrorFeedback(layout, density=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")             # e.g. torch's "non-writable NumPy array" warning
            assert ef.encode(d) == expected, name
        assert all(torch.equal(ef.residual[n], ref.residual[n]) for n in layout.names), name
        assert all(np.array_equal(d[n].numpy() if isinstance(d[n], torch.Tensor) else d[n], snapshot[n])
                   for n in d), name   # input untouched
    # layout and residual from a numpy template
    ef = ErrorFeedback(forms["numpy"], density=0.1)
    assert ef.layout == layout and ef.encode(forms["numpy"]) == expected


def test_raw_api_server_side_is_plain_sparse_aggregate():
    """The documented example: clients encode with ErrorFeedback, the server aggregates the
    payloads (any bytes-like form) with sparse_aggregate against the shared layout."""
    glob = {n: torch.zeros_like(t) for n, t in _delta().items()}
    layout = Layout.of(glob)
    clients = [ErrorFeedback(layout, density=1 / 16) for _ in range(3)]
    sizes = [10, 30, 60]
    payloads = [ef.encode(_delta(seed=i)) for i, ef in enumerate(clients)]
    weights = [n / sum(sizes) for n in sizes]
    forms = [payloads[0], bytearray(payloads[1]), np.frombuffer(payloads[2], dtype=np.uint8)]
    avg = fastlora.sparse_aggregate(forms, weights, layout=layout)
    expect = {n: torch.zeros_like(t) for n, t in glob.items()}
    for p, w in zip(payloads, weights):
        for n, t in codec.decode(p, layout=layout).to_dense(torch.float32).items():
            expect[n] += torch.tensor(w, dtype=torch.float32) * t
    for n in glob:
        assert torch.equal(avg[n], expect[n])


class TestErrors:
    def test_bad_arguments(self):
        lay = Layout.of(_delta())
        for kwargs, exc, match in [
            (dict(values="fp8"), ValueError, "values must be one of"),
            (dict(overflow="wrap"), ValueError, "overflow must be one of"),
            (dict(layout_mode="hash"), ValueError, "layout_mode"),
            (dict(values="int8", int8_block=0), ValueError, "int8_block"),
            (dict(k=3, density=0.1), ValueError, "exactly one of k or density"),
            (dict(density=1.5), ValueError, "density must be in"),
            (dict(k=-1), ValueError, "k must be >= 0"),
            (dict(k=2.0), TypeError, "k must be an int"),
            (dict(k=3, per_tensor=True), ValueError, "per_tensor selection takes density"),
        ]:
            with pytest.raises(exc, match=match):
                ErrorFeedback(lay, **kwargs)
        with pytest.raises(TypeError, match="layout must be"):
            ErrorFeedback([1, 2], density=0.1)

    def test_bad_deltas_change_nothing(self):
        layout = Layout.of(_delta())
        ef = ErrorFeedback(layout, density=0.3, per_tensor=True)
        ef.encode(_delta(seed=1))
        before = _clone(ef.residual)
        nan_last = _delta()
        nan_last["head"][2] = float("nan")     # per tensor: the earlier tensors went through first
        cases = [
            (nan_last, ValueError, "non-finite"),
            ({**_delta(), "head": torch.arange(5)}, TypeError, r"delta\['head'\] has unsupported dtype torch.int64"),
            ({**_delta(), "head": np.arange(5)}, TypeError, r"delta\['head'\] has unsupported dtype torch.int64"),
            ({"q.lora_A": torch.zeros(8, 37), "head": torch.zeros(5)}, ValueError, "missing \\['q.lora_B'\\]"),
            ({**_delta(), "extra": torch.zeros(1)}, ValueError, "extra \\['extra'\\]"),
            ({**_delta(), "head": torch.zeros(6)}, ValueError, r"delta\['head'\] has shape"),
            (torch.zeros(3), TypeError, "must be a dict"),
            ([1.0], TypeError, "delta must be a tensor"),
        ]
        for delta, exc, match in cases:
            with pytest.raises(exc, match=match):
                ef.encode(delta)
            assert all(torch.equal(_bits(before[n]), _bits(ef.residual[n])) for n in before)
        with pytest.raises(ValueError, match="density must be in"):
            ef.encode(_delta(), density=2.0)
        assert all(torch.equal(_bits(before[n]), _bits(ef.residual[n])) for n in before)

    def test_sparsify_encode_is_now_all_or_nothing_per_tensor(self):
        layout = Layout.of(_delta())
        res = fastlora.new_residual(_delta())
        res["q.lora_A"] += 0.5
        before = _clone(res)
        delta = _delta()
        delta["head"][0] = 7e4                 # the last tensor overflows fp16 (overflow="raise")
        with pytest.raises(ValueError, match="sparsify_encode: .*overflows"):
            sparsify_encode(delta, layout, density=0.5, values="fp16", residual=res, per_tensor=True)
        assert all(torch.equal(before[n], res[n]) for n in res)


@pytest.mark.parametrize("values", ["fp16", "int8"])
def test_per_tensor_density_mapping(values):
    """density={pattern: d}: each tensor keeps its own fraction (first matching pattern wins),
    exactness as everywhere; a tensor no pattern matches is an error that changes nothing."""
    layout = Layout.of(_delta())
    density = {"*.lora_B": 0.5, "head": 1.0, "*": 0.1}
    ef = ErrorFeedback(layout, density=density, values=values)
    for rnd in range(2):
        delta = _delta(seed=rnd)
        old = _clone(ef.residual)
        payload = ef.encode(delta)
        _assert_exact(payload, layout, delta, old, ef.residual)
        kept = {n: int(i.numel()) for n, (i, _) in codec.decode(payload, layout=layout).split().items()}
        assert kept == {"q.lora_A": round(0.1 * 8 * 37), "q.lora_B": round(0.5 * 37 * 8), "head": 5}
    before = _clone(ef.residual)
    with pytest.raises(ValueError, match="'q.lora_A' matches no pattern .* add a '\\*' entry"):
        ErrorFeedback(layout, density={"head": 1.0, "*.lora_B": 0.5}, values=values).encode(_delta())
    with pytest.raises(ValueError, match=r"density\['head'\]"):
        ErrorFeedback(layout, density={"head": 2.0})
    with pytest.raises(TypeError, match="patterns must be strings"):
        ErrorFeedback(layout, density={3: 0.5})
    assert all(torch.equal(before[n], ef.residual[n]) for n in before)
