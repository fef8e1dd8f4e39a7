"""`fastlora fl` on your own model and data: tiny random Hugging Face models saved to a folder
(a 2-layer Llama causal LM, a 2-layer BERT sequence classifier, each with a word-level
tokenizer built offline), local JSONL / CSV / Parquet files and a datasets.save_to_disk folder,
every client split, both task types, resume, and the errors a user meets first."""
import csv
import json
import math
import random

import pytest
import torch

from fastlora.cli import main
from fastlora.fl import make_config, parse_strategy, prepare, run, run_strategy
from fastlora.fl import custom_data as cd
from fastlora.fl import data

WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + [f"w{i}" for i in range(100)]
LABELS = ["neg", "neu", "pos"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"llama": LlamaForCausalLM folder, "bert": BertForSequenceClassification folder (5 labels),
    "bert_base": BertModel folder (no head: ambiguous task)}."""
    from transformers import (BertConfig, BertForSequenceClassification, BertModel, LlamaConfig,
                              LlamaForCausalLM)

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128))
    bert_cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=64, num_labels=5)
    out = {}
    for name, model in (("llama", llama), ("bert", BertForSequenceClassification(bert_cfg)),
                        ("bert_base", BertModel(bert_cfg))):
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


def classification_rows(n=150, seed=0):
    """Texts whose label shows in one of three marker words; 4 users; also an int label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(3)
        words = [f"w{rng.randrange(30, 100)}" for _ in range(rng.randrange(3, 9))]
        words.insert(rng.randrange(len(words) + 1), f"w{3 * y + rng.randrange(3)}")
        rows.append({"text": " ".join(words), "label": LABELS[y], "stars": [9, 10, 11][y],
                     "user": f"u{rng.randrange(4)}"})
    return rows


def lm_rows(n=120, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.randrange(40)
        prompt, response = f"w{a} w{a + 1}", f"w{a + 2} w{a + 3}"
        rows.append({"prompt": prompt, "response": response, "text": f"{prompt} {response}",
                     "user": rng.randrange(3)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    rows = classification_rows()
    out = {"jsonl": write_jsonl(root / "cls.jsonl", rows), "csv": write_csv(root / "cls.csv", rows),
           "eval_csv": write_csv(root / "eval.csv", classification_rows(30, seed=1)),
           "lm": write_jsonl(root / "lm.jsonl", lm_rows()),
           "one_class": write_jsonl(root / "one.jsonl", [dict(r, label="pos") for r in rows[:20]])}
    pq.write_table(pa.Table.from_pylist(rows), root / "cls.parquet")
    out["parquet"] = root / "cls.parquet"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:120]),
                          "test": datasets.Dataset.from_list(rows[120:])}).save_to_disk(str(root / "saved"))
    out["saved"] = root / "saved"
    return out


def config(model, data_file, **kw):
    base = dict(model=str(model), data=str(data_file), strategies=["fedavg"], num_clients=3, participation=1.0,
                rounds=2, local_steps=2, batch_size=8, lr=1e-2, eval_samples=40, max_length=16, seed=1)
    base.update(kw)
    return make_config(**base)


def strip_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


# --- reading data -----------------------------------------------------------------------------------

def test_every_format_reads_the_same_rows(files):
    tables = {k: cd.read_table(files[k]) for k in ("jsonl", "csv", "parquet", "saved")}
    ref, ev = tables["jsonl"]
    assert ev is None and len(ref) == 150 and list(ref.columns) == ["text", "label", "stars", "user"]
    ids, _, classes = cd.map_labels(ref, "label", "label_column")
    assert classes == LABELS
    for kind in ("csv", "parquet"):
        table, ev = tables[kind]
        assert ev is None and table.texts("text", "t") == ref.texts("text", "t")
        assert torch.equal(cd.map_labels(table, "label", "label_column")[0], ids)
    # CSV cells are text, but integer labels sort as numbers: 9 < 10 < 11
    assert cd.map_labels(tables["csv"][0], "stars", "label_column")[2] == [9, 10, 11]
    assert torch.equal(cd.map_labels(tables["csv"][0], "stars", "label_column")[0], ids)
    train, test = tables["saved"]   # a DatasetDict folder: train, and its test split to evaluate on
    assert len(train) == 120 and len(test) == 30 and train.texts("text", "t") == ref.texts("text", "t")[:120]


def test_label_mapping_errors(files):
    table = cd.Table({"label": ["a", 1, "b"]}, "x.jsonl")
    with pytest.raises(ValueError, match="mixes value types"):
        cd.map_labels(table, "label", "label_column")
    with pytest.raises(ValueError, match="is empty in 1 row"):
        cd.map_labels(cd.Table({"label": ["a", None, "b"]}, "x.jsonl"), "label", "label_column")
    train = cd.Table({"label": ["a", "b"]}, "train.jsonl")
    with pytest.raises(ValueError, match=r"label\(s\) \['c'\] that the training data lacks"):
        cd.map_labels(train, "label", "label_column", cd.Table({"label": ["a", "c"]}, "eval.jsonl"))
    with pytest.raises(ValueError, match="not JSON"):
        bad = files["jsonl"].with_name("bad.jsonl")
        bad.write_text('{"text": "a"}\n{oops\n')
        cd.read_table(bad)
    txt = files["jsonl"].parent / "cls.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        cd.read_table(txt)
    with pytest.raises(ValueError, match="not a datasets.save_to_disk folder"):
        cd.read_table(files["jsonl"].parent)


def test_causal_lm_tokens_mask_everything_but_the_response():
    tok = tokenizer()
    ids, mask, labels, kept = cd.causal_lm_tokens(tok, 6, prompts=["w1 w2", "w1 w2 w3 w4 w5 w6", "w7"],
                                                  responses=["w3", "w9", "w8 w9"])
    assert kept.tolist() == [True, False, True]       # the second prompt fills max_length: no target left
    bos, eos, pad = 2, 3, 0
    w = {f"w{i}": 4 + i for i in range(10)}
    assert ids.tolist() == [[bos, w["w1"], w["w2"], w["w3"], eos], [bos, w["w7"], w["w8"], w["w9"], eos]]
    assert mask.tolist() == [[1] * 5, [1] * 5]
    assert labels.tolist() == [[-100, -100, -100, w["w3"], eos], [-100, -100, w["w8"], w["w9"], eos]]
    ids, mask, labels, kept = cd.causal_lm_tokens(tok, 8, texts=["w1 w2 w3", "w4"])
    assert ids.tolist() == [[bos, w["w1"], w["w2"], w["w3"], eos], [bos, w["w4"], eos, pad, pad]]
    assert labels.tolist() == [[bos, w["w1"], w["w2"], w["w3"], eos], [bos, w["w4"], eos, -100, -100]]
    assert mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


def test_column_split_and_summary():
    names, parts = data.column_split(["b", "a", "b", "c", "a", "b"])
    assert names == ["a", "b", "c"] and [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
    assert data.column_split([10, 9, 10])[0] == [9, 10]
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    s = data.split_summary(parts, labels, ["x", "y"], names)
    assert s[1] == {"client": 1, "value": "b", "samples": 3, "label_counts": {"x": 1, "y": 2},
                    "majority_label": "y", "majority_share": 2 / 3}
    assert data.split_lines(s, column="user")[2] == "  client 1 (user=b): 3 samples, majority label y (67%)"
    with pytest.raises(ValueError, match="no value"):
        data.column_split(["a", None])


# --- config ------------------------------------------------------------------------------------------

def test_config_keys_and_validation(tmp_path):
    demo = make_config("demo")
    assert demo.target_modules == ["query", "value"] and demo.split == "auto"
    # a preset's identity (what its checkpoints record) holds none of the keys added later
    assert not {"data", "split", "dtype", "task_type", "min_client_size"} & set(demo.identity())
    assert make_config("quick", model="some/folder").target_modules == ["all-linear"]
    c = make_config("quick", split="dirichlet:1/4")
    assert (c.split, c.dirichlet_alpha) == ("dirichlet", 0.25)
    toml = tmp_path / "c.toml"
    toml.write_text('[fl]\nmodel = "m"\ndata = "d.jsonl"\nsplit = "column:user"\nmin_client_size = 5\n'
                    'prompt_column = "p"\nresponse_column = "r"\ndtype = "bfloat16"\n'
                    'target_modules = "q_proj,v_proj"\n')
    from fastlora.fl.config import load_toml
    c = make_config(**load_toml(toml))
    assert (c.split_column, c.min_client_size, c.target_modules, c.dtype) == ("user", 5, ["q_proj", "v_proj"],
                                                                            "bfloat16")
    for kw, message in [
        (dict(prompt_column="p"), "go together"),
        (dict(prompt_column="p", response_column="r", text_column="t"), "either text_column"),
        (dict(label_column="y", task_type="causal-lm"), "label_column is for classification"),
        (dict(split="column:"), "split must be one of"),
        (dict(split="halves"), "split must be one of"),
        (dict(min_client_size=0), "min_client_size"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(target_modules=["all-linear", "q"]), "all-linear stands alone"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_config("quick", model="m", data="d.jsonl", **kw)
    for kw, message in [
        (dict(split="column:user"), "set data too"),
        (dict(text_column="t"), "set data"),
        (dict(task_type="causal-lm"), "a causal LM trains on your data"),
        (dict(dtype="bfloat16"), "runs in float32"),
        (dict(data="d.jsonl", model="tiny"), "no tokenizer"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_config("quick", **kw)


# --- classification ------------------------------------------------------------------------------

def test_classifier_folder_every_strategy_runs(models, files, tmp_path):
    """A BertForSequenceClassification folder with 5 labels on 3-label data: the head is built
    for 3 labels and federated with the adapter; every strategy runs on it."""
    cfg = config(models["bert"], files["jsonl"], client_ranks=[2, 4], rank=4, rounds=1,
                 strategies=["fedavg", "flasc", "ef-topk", "exact", "fedstale"])
    res = run(cfg, tmp_path, progress=False, log=lambda s: None)
    assert "final acc" in res["table"] and len(res["records"]) == 5
    assert all(0 <= r["accuracy"] <= 1 and "perplexity" not in r for r in res["records"])
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["labels"] == LABELS and split["label_column"] == "label"
    assert split["model"]["trained_whole"] == ["classifier"] and split["model"]["lora_layers"] == 2 * 6 + 1
    assert split["split"] == "dirichlet:0.5" and sum(c["samples"] for c in split["clients"]) == 120
    assert (tmp_path / "accuracy_vs_bytes.png").exists()


def test_classifier_head_is_trained_and_a_function_of_the_seed(models, files):
    a, b = prepare(config(models["bert"], files["jsonl"])), prepare(config(models["bert"], files["jsonl"]))
    names = list(a.initial_adapter)
    assert names[-2:] == ["model.classifier.weight", "model.classifier.bias"]
    assert a.initial_adapter["model.classifier.weight"].shape == (3, 64)
    assert all(torch.equal(a.initial_adapter[n], b.initial_adapter[n]) for n in names)
    other = prepare(config(models["bert"], files["jsonl"], seed=2)).initial_adapter
    assert not torch.equal(other["model.classifier.weight"], a.initial_adapter["model.classifier.weight"])
    res = run_strategy(a, parse_strategy("fedavg"), progress=False, stop_after=1)
    assert not torch.equal(res["adapter"]["model.classifier.weight"], a.initial_adapter["model.classifier.weight"])


def test_every_format_and_split(models, files):
    kinds = {}
    for key, kw in [("csv", dict(split="iid", num_clients=4)),
                    ("parquet", dict(split="column:user", num_clients=7)),
                    ("saved", dict(split="dirichlet:0.3", min_client_size=40)),
                    ("jsonl", dict(eval_file=str(files["eval_csv"]), label_column="stars"))]:
        kinds[key] = prepare(config(models["bert"], files[key], **kw))
    iid = kinds["csv"]
    assert iid.config.num_clients == 4 and max(iid.client_sizes) - min(iid.client_sizes) <= 1
    col = kinds["parquet"].split_info
    assert [c["value"] for c in col["clients"]] == ["u0", "u1", "u2", "u3"] and col["num_clients"] == 4
    assert kinds["parquet"].config.num_clients == 4
    assert any("gives 4 clients (one per value); num_clients=7 is not used" in n for n in col["notes"])
    assert all(0 < c["majority_share"] <= 1 for c in col["clients"])
    saved = kinds["saved"]   # evaluates on the folder's test split; small clients dropped
    assert saved.split_info["eval_samples"] == 30 and saved.split_info["eval"] == "the data's evaluation split"
    assert all(n >= 40 for n in saved.client_sizes) and saved.config.num_clients == len(saved.client_sizes) < 3
    assert any("dropped" in n for n in saved.split_info["notes"])
    ev = kinds["jsonl"]
    assert ev.split_info["labels"] == [9, 10, 11] and ev.split_info["eval_samples"] == 30
    assert sum(ev.client_sizes) == 150


def test_cli_classification_and_resume(models, files, tmp_path, capsys):
    argv = ["fl", "--model", str(models["bert"]), "--data", str(files["csv"]), "--split", "column:user",
            "--strategy", "fedavg,ef-topk", "--rounds", "2", "--set", "local_steps=2", "--max-length", "16",
            "--target-modules", "query,value", "--lora-alpha", "8", "--rank", "4", "--out", str(tmp_path),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "# split column:user: 4 clients" in out and "client 0 (user=u0)" in out and "final acc" in out
    assert "num_clients=8 is not used" in out      # the demo preset's 8 clients
    first = json.loads((tmp_path / "metrics.json").read_text())["records"]
    assert main(argv + ["--resume"]) == 0          # finished: nothing is redone
    assert strip_times(json.loads((tmp_path / "metrics.json").read_text())["records"]) == strip_times(first)
    assert main(argv + ["--lr", "0.5", "--resume"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_max_length_is_capped_at_what_the_model_takes(models, files):
    exp = prepare(config(models["bert"], files["jsonl"], max_length=100))   # 64 position embeddings
    assert exp.input_ids.shape[1] == 64
    assert any("samples are cut at 64 tokens" in n for n in exp.split_info["notes"])


def test_task_type_from_config_columns_or_flag(models, files):
    # a causal-LM folder with a label column: an error saying how to classify with it ...
    with pytest.raises(ValueError, match="is a causal LM.*--task-type classify"):
        prepare(config(models["llama"], files["jsonl"], label_column="label"))
    # ... which works: a LlamaForSequenceClassification whose new `score` head is trained whole
    exp = prepare(config(models["llama"], files["jsonl"], label_column="label", task_type="classify"))
    assert exp.task_type == "classify" and exp.split_info["model"]["trained_whole"] == ["score"]
    assert exp.split_info["model"]["lora_layers"] == 2 * 7
    # a headless BertModel folder: the label column decides; without one the task is ambiguous
    assert prepare(config(models["bert_base"], files["jsonl"], label_column="label")).task_type == "classify"
    with pytest.raises(ValueError, match="cannot tell whether.*--task-type"):
        prepare(config(models["bert_base"], files["jsonl"]))


def test_builtin_models_and_tasks_with_your_own_parts(models, files):
    """minilm on your data; a model folder on the built-in synthetic task."""
    exp = prepare(config("minilm", files["jsonl"], target_modules=None))
    assert exp.split_info["labels"] == LABELS and list(exp.initial_adapter)[-1] == "head.bias"
    exp = prepare(make_config("quick", model=str(models["bert"]), num_samples=60, num_clients=2, rounds=1))
    assert exp.task_type == "classify" and exp.initial_adapter["model.classifier.weight"].shape[0] == 6


# --- causal LM -----------------------------------------------------------------------------------

def test_causal_lm_prompt_response_column_split_resume(models, files, tmp_path):
    cfg = config(models["llama"], files["lm"], prompt_column="prompt", response_column="response",
                 split="column:user", rounds=3, participation=0.5, lora_dropout=0.1)
    exp = prepare(cfg)
    assert exp.task_type == "causal-lm" and exp.labels.shape == exp.input_ids.shape
    assert exp.split_info["num_clients"] == 3 and "labels" not in exp.split_info
    # only response tokens (and EOS) are targets: 2 + 1 per sample
    assert ((exp.labels != -100).sum(1) == 3).all()
    s = parse_strategy("ef-topk:up=1/8")
    full = run_strategy(exp, s, tmp_path / "full", progress=False)
    run_strategy(prepare(cfg), s, tmp_path / "cut", progress=False, stop_after=1)
    resumed = run_strategy(prepare(cfg), s, tmp_path / "cut", resume=True, progress=False)
    assert strip_times(resumed["records"]) == strip_times(full["records"])
    assert all(torch.equal(resumed["adapter"][n], t) for n, t in full["adapter"].items())
    for r in full["records"]:
        assert r["accuracy"] is None and math.isclose(r["perplexity"], math.exp(r["loss"]))
    assert full["records"][-1]["loss"] < math.log(128) + 0.5


def test_cli_causal_lm_text_column_eval_file_bfloat16(models, files, tmp_path, capsys):
    eval_file = write_csv(tmp_path / "eval.csv", lm_rows(20, seed=3))
    argv = ["fl", "--model", str(models["llama"]), "--data", str(files["lm"]), "--eval-file", str(eval_file),
            "--text-column", "text", "--split", "iid", "--clients", "3", "--rounds", "2", "--strategy",
            "fedavg,flasc", "--dtype", "bfloat16", "--set", "local_steps=2", "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "final ppl" in out and "final acc" not in out and "causal LM" in out
    assert (tmp_path / "o" / "perplexity_vs_bytes.png").exists()
    recs = json.loads((tmp_path / "o" / "metrics.json").read_text())["records"]
    assert all(r["perplexity"] > 1 and math.isfinite(r["perplexity"]) for r in recs)
    header = (tmp_path / "o" / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",")[:15] == list(__import__("fastlora.fl.report", fromlist=["x"]).RECORD_FIELDS)
    assert "perplexity" in header


def test_bfloat16_base_keeps_a_float32_adapter(models, files):
    exp = prepare(config(models["llama"], files["lm"], text_column="text", task_type="causal-lm",
                         dtype="bfloat16", split="iid"))
    assert all(t.dtype == torch.float32 for t in exp.initial_adapter.values())
    base = exp.model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.dtype == torch.bfloat16 and not base.requires_grad


def test_dirichlet_needs_labels(models, files):
    with pytest.raises(ValueError, match="a causal LM has none"):
        prepare(config(models["llama"], files["lm"], text_column="text", split="dirichlet"))


# --- errors: one line, exit code 2 (CLI); ValueError (API) ----------------------------------------

@pytest.mark.parametrize("case", ["missing column", "empty client", "min size", "not a model", "a file",
                                  "one class", "hub id", "target", "split column"])
def test_errors(models, files, tmp_path, capsys, case):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("not a model")
    model, data_file, kw = models["bert"], files["jsonl"], {}
    message = {
        "missing column": "no column 'txt' (text_column) in",
        "empty client": "cannot give each of 500 clients one",
        "min size": "no client has min_client_size=100 training samples",
        "not a model": "is not a Hugging Face model folder: it has no config.json",
        "a file": "is a file; give a model folder",
        "one class": "has a single class ('pos'); classification needs at least two",
        "hub id": "is not a folder and not in the local Hugging Face cache",
        "target": "match no linear layer",
        "split column": "no column 'site' (split column:site)",
    }[case]
    if case == "missing column":
        kw = dict(text_column="txt")
    elif case == "empty client":
        kw = dict(split="iid", num_clients=500)
    elif case == "min size":
        kw = dict(min_client_size=100)
    elif case == "not a model":
        model = not_a_model
    elif case == "a file":
        model = files["jsonl"]
    elif case == "one class":
        data_file = files["one_class"]
    elif case == "hub id":
        model = "fastlora-tests/no-such-model-in-any-cache"
    elif case == "target":
        kw = dict(target_modules=["q_proj"])
    elif case == "split column":
        kw = dict(split="column:site")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(config(model, data_file, **kw))
    flags = {"text_column": "--text-column", "num_clients": "--clients", "min_client_size": "--min-client-size",
             "split": "--split", "target_modules": "--target-modules"}
    argv = ["fl", "--model", str(model), "--data", str(data_file), "--out", str(tmp_path / "o"), "--no-progress"]
    for k, v in kw.items():
        argv += [flags[k], ",".join(v) if isinstance(v, list) else str(v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if case == "missing column":
        assert "its columns are: 'text', 'label', 'stars', 'user'" in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_base_of_a_model_folder(models, files, tmp_path, dtype):
    """--base nf4 on a causal LM folder: the frozen linear layers are quantized (the output layer
    is not), LoRA runs over them on the fused op, and the run trains to a finite perplexity."""
    import fastlora
    import fastlora.peft

    cfg = config(models["llama"], files["lm"], text_column="text", task_type="causal-lm", split="iid",
                 base="nf4", dtype=dtype)
    exp = prepare(cfg)
    inner = exp.model.model
    assert isinstance(inner.model.layers[0].self_attn.q_proj.base_layer, fastlora.QuantizedLinear)
    assert type(inner.lm_head) is fastlora.Float32ComputeLinear  # not quantized; patched as a plain layer
    assert exp.split_info["base"]["format"] == "nf4"
    before = fastlora.peft.fast_path_calls(exp.model)
    exp.model(exp.input_ids[:2], exp.attention_mask[:2]).float().sum().backward()
    assert fastlora.peft.fast_path_calls(exp.model) > before
    recs = run(cfg, tmp_path)["records"]
    assert all(math.isfinite(r["perplexity"]) for r in recs)


def test_target_modules_regex_as_peft(models, files):
    """One target with regular-expression characters is matched against the full module path
    (PEFT's string form); one that matches nothing or does not compile is a clear error."""
    exp = prepare(config(models["llama"], files["lm"], text_column="text", task_type="causal-lm", split="iid",
                         target_modules=[r"model\.layers\.0\.self_attn\.(q|v)_proj"]))
    lora = sorted({n.split(".lora_")[0] for n in exp.initial_adapter})
    assert lora == ["model.model.layers.0.self_attn.q_proj", "model.model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match="match no linear layer"):
        prepare(config(models["llama"], files["lm"], text_column="text", task_type="causal-lm", split="iid",
                       target_modules=[r".*\.nothing_(a|b)"]))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        prepare(config(models["llama"], files["lm"], text_column="text", task_type="causal-lm", split="iid",
                       target_modules=[r"model\.(q"]))
