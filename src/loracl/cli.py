"""The `loracl` command line. Errors the user can fix are shown as one line; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import sys
import textwrap
import warnings
from collections.abc import Sequence

from . import __version__
from .errors import LoraclError, RunInterrupted

EPILOG = """examples:
  loracl run configs/demo.yaml
  loracl run configs/tiny.yaml --set method.name=seq_lora --set train.lr=1e-3 --output runs/tiny-seq
  loracl run configs/demo.yaml --set benchmark.tasks='[agnews,yelp]' --set method.schedule=inv
  loracl run --resume --output runs/tiny-seq      # continue after a crash or Ctrl-C
  loracl methods
  loracl benchmarks"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a continual-learning sequence from a YAML config",
        description="Train on each task of a sequence in turn with a continual-learning method, evaluate on "
        "every task after each one, and write a run directory (config.yaml, results.json, report.md, "
        "matrix.png, adapter/, tasks/).",
        epilog="Any config key can be set with --set, e.g. --set model.name=tiny-random-llama "
        "--set lora.r=16 --set benchmark.order=order2 --set method.merge=A_and_B",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (omit to start from the defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted path, YAML value); repeatable",
    )
    p.add_argument("--output", "-o", help="run directory (default: runs/<method>-<date>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output after its last finished task (config: that run's config.yaml; "
        "a config given again must match it)",
    )
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runner import run

    given = args.config is not None or args.overrides
    config = load_config(args.config, args.overrides) if given or not args.resume else None
    run(config, args.output, overwrite=args.overwrite, resume=args.resume)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import available_methods

    methods = available_methods()
    width = max(len(name) for name in methods) + 1
    for name, cls in methods.items():
        options = ", ".join(cls.Options.model_fields) or "-"
        print(f"{name:<{width}} {cls.summary}")
        print(
            f"{'':<{width}} data-free: {'yes' if cls.data_free else 'no'}; memory in T: {cls.memory_growth}; "
            f"options: {options}"
        )
    return 0


def _cmd_benchmarks(args: argparse.Namespace) -> int:
    from .data import ORDERS, benchmark_names

    print("benchmarks: " + ", ".join(benchmark_names()))
    print("orders (benchmark.order):")
    for name, tasks in ORDERS.items():
        print(
            textwrap.fill(
                ", ".join(tasks),
                width=100,
                initial_indent=f"  {name}: ",
                subsequent_indent=" " * (len(name) + 4),
            )
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loracl",
        description="Continual learning of large language models with LoRA (SLAO and baselines).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loracl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_run(sub)
    sub.add_parser(
        "methods",
        help="list the continual-learning methods",
        description="List every registered method: what it does, whether it is data-free and "
        "how its memory grows with the number of tasks.",
    ).set_defaults(handler=_cmd_methods)
    sub.add_parser(
        "benchmarks",
        help="list benchmarks and task orders",
        description="List the benchmark formats and the named task orders.",
    ).set_defaults(handler=_cmd_benchmarks)
    return parser


def _quiet_library_noise() -> None:
    # A deprecation inside PEFT/transformers that users can do nothing about.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_library_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")  # accepted anywhere on the line
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LoraclError as exc:
        if debug:
            raise
        label = "interrupted" if isinstance(exc, RunInterrupted) else "error"
        print(f"{label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
