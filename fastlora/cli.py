"""The ``fastlora`` command.

    fastlora bench   LoRA linear benchmark table: fastlora vs PEFT vs the frozen base layer
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bench(args) -> int:
    from fastlora import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = bench.LORA_LINEAR_CASES
    if args.quick:
        cases = cases[:3]
    print(f"# fastlora LoRA linear benchmark: {bench.environment_line(device)}, {args.dtype}")
    print("# medians of interleaved rounds; overhead = fastlora fwd+bwd / base fwd+bwd - 1")
    print(bench.TABLE_HEADER)
    bench.run_lora_linear(cases, dtype=DTYPES[args.dtype], device=device, budget_s=args.budget)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="LoRA linear benchmark table (fastlora vs PEFT vs base)")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    b.add_argument("--dtype", choices=list(DTYPES), default="float32")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    b.add_argument("--quick", action="store_true", help="skip the largest case")
    b.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case and mode")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
