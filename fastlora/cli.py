"""The ``fastlora`` command.

    fastlora fl      federated LoRA fine-tuning on one machine: strategies side by side,
                     accuracy and the bytes they communicated (``--preset demo``)
    fastlora bench   LoRA linear benchmark table: fastlora vs PEFT vs the frozen base layer
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bench_case(text: str):
    """--case M,IN,OUT,R,P -> (M, in, out, r, p), with argparse's error for anything else."""
    import argparse

    parts = text.split(",")
    try:
        if len(parts) != 5:
            raise ValueError
        m, n_in, n_out, r = (int(v) for v in parts[:4])
        p = float(parts[4])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,IN,OUT,R,P (four integers and a probability), got {text!r}")
    if m < 1 or n_in < 1 or n_out < 1 or r < 1 or not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(f"M, IN, OUT and R must be >= 1 and 0 <= P < 1, got {text!r}")
    return (m, n_in, n_out, r, p)


def _bench(args) -> int:
    from fastlora import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        import os

        import fastlora
        used = fastlora.use_cpu_isa(args.isa)
        if used != args.isa and args.isa != "auto":
            print(f"fastlora bench: this CPU has no {args.isa} build; running {used}", file=sys.stderr)
        if used != "avx512" and not (os.environ.get("MKL_ENABLE_INSTRUCTIONS") and os.environ.get("ONEDNN_MAX_CPU_ISA")):
            print("# note: the BLAS is not capped; to time exactly what such a machine runs, also set "
                  "MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA (e.g. AVX2 / AVX2) in the environment")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = bench.LORA_LINEAR_CASES
    if args.case:
        cases = args.case
    elif args.quick:
        cases = cases[:3]
    adapters = args.dtype if args.adapter_dtype == "same" else args.adapter_dtype
    print(f"# fastlora LoRA linear benchmark: {bench.environment_line(device)}, {args.dtype}"
          + ("" if adapters == args.dtype else f", {adapters} adapters"))
    print("# medians of interleaved rounds; overhead = fastlora fwd+bwd / base fwd+bwd - 1; [q1, q3] = the "
          "quartiles of the same ratio taken round by round (its spread on this machine)")
    print(bench.TABLE_HEADER)
    bench.run_lora_linear(cases, dtype=DTYPES[args.dtype], device=device, budget_s=args.budget,
                          adapter_dtype=None if adapters == args.dtype else DTYPES[adapters])
    return 0


# flags of `fastlora fl` that set a config field (dest = field name)
_FL_FLAGS = [
    ("--strategy", "strategies", "strategy spec, repeatable or comma-separated: NAME[:key=value,...], e.g. "
                                 "fedavg, flasc:up=1/16,down=1/4, ef-topk:up=1/64, exact, fedstale:beta=0.5"),
    ("--model", "model", "minilm (pretrained all-MiniLM-L6-v2), tiny (random, for quick looks), or PATH: a Hugging "
                         "Face model folder (a hub id only from the local cache: nothing is downloaded)"),
    ("--task", "task", "stdlib (docstrings labelled by package) or synthetic; --data replaces it"),
    ("--task-type", "task_type", "auto (from the model's config, then the columns), classify or causal-lm"),
    ("--data", "data", "your data: a .jsonl / .json / .csv / .parquet file or a datasets.save_to_disk folder"),
    ("--eval-file", "eval_file", "evaluation data (same formats); default: test_fraction of --data held out"),
    ("--text-column", "text_column", "column of the texts (default: text)"),
    ("--label-column", "label_column", "classification: column of the labels, strings or ints (default: label)"),
    ("--prompt-column", "prompt_column", "causal LM: column of the prompts (with --response-column: loss on the "
                                         "response tokens only)"),
    ("--response-column", "response_column", "causal LM: column of the responses"),
    ("--split", "split", "client split: auto (dirichlet for classification, iid for a causal LM), iid, "
                         "dirichlet[:ALPHA], column:NAME (one client per value of a data column)"),
    ("--min-client-size", "min_client_size", "clients with fewer training samples are dropped (with a note)"),
    ("--target-modules", "target_modules", "LoRA targets: module names, comma-separated, or all-linear (default: "
                                           "query,value for minilm / tiny, all-linear for a model folder)"),
    ("--lora-alpha", "lora_alpha", "LoRA alpha (scaling alpha / rank)"),
    ("--dtype", "dtype", "base weights of a model folder: float32 or bfloat16 (LoRA and head stay float32)"),
    ("--base", "base", "the frozen base's linear layers on each client: fp32 (as loaded), nf4 or int8 "
                       "(QLoRA: quantized with fastlora.quantize_model)"),
    ("--max-length", "max_length", "tokens per sample (longer ones are cut)"),
    ("--test-fraction", "test_fraction", "fraction of the data held out for evaluation (without --eval-file)"),
    ("--rounds", "rounds", "federated rounds"),
    ("--clients", "num_clients", "number of clients"),
    ("--participation", "participation", "fraction of clients selected per round"),
    ("--client-dropout", "client_dropout", "fraction of selected clients that fail mid-round"),
    ("--dirichlet-alpha", "dirichlet_alpha", "non-IID label split (small = skewed)"),
    ("--client-ranks", "client_ranks", "LoRA rank per client, cycled, e.g. 4,8 (exact strategy)"),
    ("--local-steps", "local_steps", "local optimizer steps per round"),
    ("--batch-size", "batch_size", "local minibatch size"),
    ("--lr", "lr", "local learning rate"),
    ("--rank", "rank", "LoRA rank"),
    ("--seed", "seed", "seed of everything"),
    ("--initial", "initial", "round 1: seed (clients build the initial adapter from the seed; 8 bytes sent) "
                             "or download (the server sends it)"),
    ("--threads", "threads", "torch CPU threads (0: torch's default)"),
]


def _fl(args) -> int:
    from pathlib import Path

    from fastlora.fl import config as flconfig
    from fastlora.fl.checkpoint import CheckpointError
    from fastlora.fl.model import ModelUnavailable
    from fastlora.fl.simulation import run

    try:
        values = {}
        preset = args.preset
        if args.config:
            values = flconfig.load_toml(args.config)
            preset = preset or values.pop("preset", None)
            values.pop("preset", None)
        flags = {}
        for _, dest, _ in _FL_FLAGS:
            v = getattr(args, dest)
            if v is not None:
                if dest == "strategies":
                    v = [s for item in v for s in _split_specs(item)]
                flags[dest] = v
        for item in args.set or []:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set expects key=value, got {item!r}")
            flags.update(flconfig.normalise({key: value}, source="--set"))
        values.update(flconfig.normalise(flags, source="flags"))
        if preset is None and not args.config:
            preset = "demo"
        cfg = flconfig.make_config(preset, **values)
    except (ValueError, OSError) as e:
        print(f"fastlora fl: {e}", file=sys.stderr)
        return 2
    default_out = (preset or "custom") if cfg.builtin_model else Path(cfg.model).name
    out = Path(args.out) if args.out else Path("fl_runs") / default_out
    try:
        result = run(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (ModelUnavailable, CheckpointError, ValueError) as e:
        # ValueError: what the data or the model cannot take (a split that leaves a client
        # empty, a rank wider than a layer, training that diverged), each with its reason.
        print(f"fastlora fl: {e}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    print()
    print(result["time_table"])
    for kind, path in result["files"].items():
        print(f"{kind}: {path}")
    if "plot" not in result["files"]:
        print("plot: skipped (pip install matplotlib)")
    return 0


def _split_specs(text: str):
    """Splits "fedavg,flasc:up=1/16,down=1/4,ef-topk" into strategy specs: a comma starts a new
    spec only when what follows is not key=value."""
    specs = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if specs and "=" in part and ":" not in part:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="LoRA linear benchmark table (fastlora vs PEFT vs base)")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    b.add_argument("--dtype", choices=list(DTYPES), default="float32")
    b.add_argument("--adapter-dtype", choices=["same", "float32"], default="same",
                   help="the LoRA weights' dtype: same as --dtype, or float32 on a bfloat16 / float16 base "
                        "(PEFT's default for half-precision models)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    b.add_argument("--quick", action="store_true", help="skip the largest case")
    b.add_argument("--case", action="append", type=_bench_case, metavar="M,IN,OUT,R,P",
                   help="time this case instead of the default ones (rows, in / out features, rank, dropout "
                        "probability; repeatable), e.g. --case 32,4096,4096,64,0.1")
    b.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case and mode")
    b.add_argument("--isa", choices=["amx", "avx512", "avx2", "baseline", "auto"], default=None,
                   help="run fastlora's CPU kernels' build for this instruction set (capped at the CPU's; "
                        "same as FASTLORA_CPU_ISA)")
    b.set_defaults(func=_bench)
    f = sub.add_parser("fl", help="federated LoRA fine-tuning on one machine (try --preset demo)",
                       description="Federated LoRA fine-tuning simulated on one machine: each strategy runs "
                                   "in turn on the same clients; prints accuracy and the bytes each sent. "
                                   "Config: a --preset, a --config TOML file (same keys as the flags, "
                                   "underscores), then flags and --set key=value on top.")
    f.add_argument("--preset", choices=["demo", "quick"], default=None,
                   help="demo: MiniLM on stdlib docstrings (default); quick: a tiny random model, seconds")
    f.add_argument("--config", help="TOML file of config keys (top level or under [fl])")
    for flag, dest, help_ in _FL_FLAGS:
        if dest == "strategies":
            f.add_argument(flag, dest=dest, action="append", metavar="SPEC", help=help_)
        else:
            f.add_argument(flag, dest=dest, default=None, metavar=flag.lstrip("-").upper().replace("-", "_"), help=help_)
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config key")
    f.add_argument("--out", help="output folder (default: fl_runs/<preset>, or fl_runs/<model folder name>)")
    f.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --out (finished runs are not redone)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_fl)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
