"""fastlora.fl: a thin federated LoRA loop on one machine (clients, server, strategies, honest
byte accounting), built from fastlora's ops and wire format.

    from fastlora.fl import make_config, run
    result = run(make_config("quick"), out_dir="fl_runs/quick")
    print(result["table"])

Pieces, for your own loop: :mod:`fastlora.fl.client` (sparsify + encode an update, decode a
download), :mod:`fastlora.fl.server` (downloads, aggregation, server optimizer),
:mod:`fastlora.fl.strategies` (named strategies and their papers), :mod:`fastlora.fl.data`
(stdlib docstring task, Dirichlet / IID / column splits), :mod:`fastlora.fl.custom_data` (your
own JSONL / CSV / Parquet / saved-dataset files), :mod:`fastlora.fl.model` (LoRA on the built-in
classifier or on a Hugging Face model folder: a classifier or a causal LM),
:mod:`fastlora.fl.report` (tables, CSV/JSON, plot), :mod:`fastlora.fl.checkpoint`.
"""
from fastlora.fl.config import PRESETS, FLConfig, load_toml, make_config
from fastlora.fl.simulation import Experiment, prepare, run, run_strategy
from fastlora.fl.strategies import Strategy, parse_strategy

__all__ = ["FLConfig", "PRESETS", "make_config", "load_toml", "run", "run_strategy", "prepare", "Experiment",
           "Strategy", "parse_strategy"]
