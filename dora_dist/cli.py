"""`dora-dist` command line.

dora-dist train [--config FILE.yaml] [key=value ...]    fine-tune (same as python -m dora_dist.train)
dora-dist merge --adapter DIR [--base PATH] --out DIR     write a merged model transformers can load (streamed)
dora-dist generate --adapter DIR --prompt "..."           generate text (see dora_dist/generate.py)
dora-dist keys                                            list every config key
dora-dist analyze --base DIR --tuned T1 T2 ... [--out DIR]  magnitude/direction change per layer (DoRA Fig. 2)
dora-dist plan --config F --nodes M --gpus-per-node N     memory, fit, tokens/s and engine advice (no download)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP_EPILOG = """examples:
  dora-dist train                                   # built-in quickstart: tiny Llama + synthetic corpus
  dora-dist train --config configs/quickstart.yaml training.max_steps=50
  torchrun --nproc-per-node 2 -m dora_dist.train --config configs/quickstart.yaml
  dora-dist merge --adapter outputs/quickstart/adapter --out outputs/quickstart/merged
  dora-dist generate --adapter outputs/quickstart/adapter --prompt "17 + 5 =" --no-chat-template
  dora-dist analyze --base BASE_DIR --tuned run-lora/adapter run-dora/adapter --out outputs/analysis
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-dist",
        description="DoRA / QDoRA fine-tuning of causal LMs, from one CPU process to many GPUs on many nodes.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    tr = sub.add_parser("train", help="fine-tune (under torchrun for several processes)")
    tr.add_argument("--config", "-c", default=None, help="YAML config (default: built-in quickstart)")
    from dora_dist.train import add_entry_flags

    add_entry_flags(tr)
    tr.add_argument("overrides", nargs="*", help="dotted overrides: training.lr=1e-3 parallel.engine=fsdp2 ...")
    mg = sub.add_parser("merge", help="merge an adapter into its base model and save it (safetensors)")
    mg.add_argument("--adapter", required=True, help="adapter directory (PEFT format, e.g. <output.dir>/adapter)")
    mg.add_argument(
        "--base", default=None, help="base model path or hub id (default: the adapter's base_model_name_or_path)"
    )
    mg.add_argument("--out", required=True, help="output directory for the merged model")
    mg.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the merged weights (auto: the base checkpoint's; merged in fp32, rounded once)",
    )
    mg.add_argument(
        "--onto",
        default="trained",
        choices=["trained", "original"],
        help="QDoRA: merge onto the dequantized 4-bit weights the adapter was trained with (trained, default) "
        "or onto the original dense weights",
    )
    mg.add_argument(
        "--verify",
        action="store_true",
        help="read the written model back tensor by tensor and check it against base + adapter",
    )
    from dora_dist.generate import add_parser as add_generate_parser

    add_generate_parser(sub)
    sub.add_parser("keys", help="list every config key: type, default, allowed values, what it does")
    an = sub.add_parser("analyze", help="magnitude (ΔM) and direction (ΔD) change per layer against the base")
    an.add_argument("--base", required=True, help="base model directory (safetensors), or builtin:tiny-llama")
    an.add_argument(
        "--tuned",
        required=True,
        nargs="+",
        metavar="[METHOD=]DIR",
        help="adapter directories (PEFT format, LoRA or DoRA) and/or model directories (merged or full "
        "fine-tune); METHOD= names the group (default: dora/lora from the adapter, 'full' for a model)",
    )
    an.add_argument("--out", default=None, help="write changes.json, changes.csv and scatter_<method>.png here")
    an.add_argument(
        "--base-quant",
        default=None,
        choices=["nf4", "fp4"],
        help="compare with the 4-bit quantization of the base (what a QDoRA adapter was trained on)",
    )
    an.add_argument("--layers", default=None, help="regex selecting layer names (default: all but embeddings)")
    from dora_dist.plan.report import add_arguments as plan_arguments

    plan_arguments(
        sub.add_parser(
            "plan", help="project memory per rank, fit, tokens/s and the best engine for a cluster (nothing downloaded)"
        )
    )
    for name, command in sub.choices.items():
        if name != "train":  # train has it already (add_entry_flags)
            command.add_argument(
                "--debug", action="store_true", help="show the traceback of an input error (also DORA_DIST_DEBUG=1)"
            )
    return parser


def merge(
    adapter: str, out: str, base: str | None = None, dtype: str = "auto", onto: str = "trained", verify: bool = False
) -> Path:
    """Stream the base checkpoint tensor by tensor, fold W' = m·(W+sBA)/‖W+sBA‖ into the adapted weights and write
    the merged model (dora_dist/merge/run.py)."""
    from dora_dist.merge import merge as stream_merge

    return stream_merge(adapter, out, base, dtype, onto=onto, verify=verify)


def check_merge_out(adapter_dir: Path, out_dir: Path) -> None:
    """--out must not be the adapter directory, inside it, or an existing file (kept for callers of the old name)."""
    from dora_dist.merge import check_out_dir

    check_out_dir(out_dir, adapter_dir)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    from dora_dist.errors import JobFault, UserError, report_error

    try:
        if args.command == "train":
            from dora_dist.train import run_job

            return run_job(args.config, args.overrides, check_only=args.check)
        elif args.command == "merge":
            merge(args.adapter, args.out, args.base, args.dtype, args.onto, args.verify)
        elif args.command == "generate":
            from dora_dist.generate import run as run_generate

            return run_generate(args)
        elif args.command == "keys":
            from dora_dist.config_keys import format_keys

            print(format_keys())
        elif args.command == "plan":
            from dora_dist.plan.report import run as plan

            return plan(args)
        elif args.command == "analyze":
            from dora_dist.analysis import analyze

            analyze(args.base, args.tuned, args.out, base_quant=args.base_quant, layers=args.layers)
        else:
            parser.print_help()
    except (UserError, JobFault) as exc:  # one line (rank 0), exit 2 (bad input) or 1; anything else is a bug
        return report_error(exc, getattr(args, "debug", False))
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (or a second one inside): one line
        from dora_dist.preemption import interrupted_now

        return interrupted_now(getattr(args, "debug", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
