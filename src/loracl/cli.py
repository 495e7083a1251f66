"""The `loracl` command line. Errors the user can fix are shown as one line; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import HELD_BACK_EXIT, ConfigError, LoraclError, RunInterrupted

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from .methods.catalog import MethodSpec

EPILOG = """examples:
  loracl run configs/demo.yaml
  loracl run configs/tiny.yaml --set method.name=seq_lora --set train.lr=1e-3 --output runs/tiny-seq
  loracl run configs/demo.yaml --set benchmark.tasks='[agnews,yelp]' --set method.schedule=inv
  loracl run --resume --output runs/tiny-seq      # continue after a crash or Ctrl-C
  loracl export runs/tiny --to exported/tiny --merge
  loracl eval runs/tiny --tasks dbpedia,yahoo --max-test 100
  loracl predict runs/tiny "Classify the topic: ... Answer:"
  loracl bench configs/demo.yaml --methods slao,seq_lora --orders order1,order2,order3
  loracl methods
  loracl methods slao                             # one method's options: types, defaults, meaning
  loracl benchmarks
  loracl data check ../shared/data/cl_benchmark --order order4"""

BENCH_EPILOG = """examples:
  loracl bench configs/demo.yaml --methods slao,seq_lora,olora,inflora,mtl --orders order1,order2,order3
  loracl bench configs/demo.yaml --methods slao,slao:schedule=inv,slao:init=random --orders order1 \\
      --output runs/bench-ablation --label "SLAO ablation"
  loracl bench configs/tiny.yaml --methods slao,seq_lora --orders agnews+yelp,yelp+agnews --max-train 8
  loracl bench configs/gpu.yaml --methods slao,seq_lora,olora,inflora,mtl --jobs 4
  loracl bench configs/demo.yaml --methods slao,seq_lora --orders order4,order5,order6 \\
      --set eval.matrix=metrics --output runs/bench-long     # 15 tasks: 43 task evaluations, not 225
  loracl bench configs/demo.yaml --methods slao,seq_lora,ewc --orders order1,order2 \\
      --tune 'train.lr=1e-4,3e-4,1e-3;method.lam=1,100' --select-on validation
  loracl bench --report-only runs/bench

Each cell (method, order) is an ordinary run directory, DIR/<method>/<order>/, keeping only its last adapter
version (versions.keep: 1 unless the config or --set says otherwise). A cell whose results.json is
complete and holds the same resolved config (up to output_dir, model.cache_dir and eval.matrix; a sparse
matrix does not stand in for a full one) is skipped, so rerunning the same command resumes the grid.
A failing cell is recorded (DIR/<method>/<order>/bench_error.txt) and reported; the others still run and
the exit status is 1. Options in the config's method section apply to every method; give one method its
own with NAME:KEY=VALUE, and any config key for its cells alone with a dotted key, e.g.
seq_lora:train.lr=3e-4 or ewc:method.lam=1000 (not benchmark.order/tasks or output_dir, which the grid
sets). The base model is evaluated once per order (scores cached in DIR/_zero_shot/).

Hyper-parameter selection (--tune): KEY=V1,V2,... with KEY a dotted config key and each value YAML (a list
in brackets is one value); several keys separated by ';' (or --tune repeated) are crossed: every
combination is a candidate, the first key varying slowest. Each method runs every candidate on every order
with evaluation on a validation split carved from train (benchmark.validation_fraction; 0.1 when the config
sets none; the final runs leave the same examples out of training), in DIR/tune/<method>/<candidate>/<order>/
(eval.split=validation: no test file is opened). Per method the candidate with the best mean validation AP
over the orders is chosen (a tie: the first listed), then run on test as an ordinary cell. A key the
method sets itself in --methods (seq_lora:train.lr=3e-4) is not tuned for it; a method.KEY is tuned only for
the methods that have that option; a method that does not train is not tuned. bench.md's "Selection on
validation" and bench.json's "selection" give every candidate's scores and the choice.

Seeds (--seeds 1,2,3): every cell, tuning ones included, runs at each train.seed, in
DIR/<method>/<order>/seed-<s>/ (a grid without --seeds keeps DIR/<method>/<order>/; a bench directory holds
one layout or the other). bench.md's intervals (95 % bootstrap, from each cell's predictions): AP over the
test examples with orders and seeds fixed, and over orders, seeds and test examples (hierarchical); every
two methods' paired difference, marked resolved or not, with the test examples per task that would
resolve it."""


class _ReportTo(argparse.Action):
    """`run --report-to NAME[,NAME...]` (repeatable; `none`: no tracker) as the override
    tracking.report_to=[every name given so far], so it reaches the config, config.yaml and --resume's
    check like any --set (and replaces the config file's list, as a later --set would)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        from .config import TRACKERS

        names = [name.strip() for name in str(values).split(",") if name.strip()]
        for name in names:
            if name not in (*TRACKERS, "none"):
                parser.error(f"argument --report-to: unknown tracker {name!r} (choose from "
                             f"{', '.join(TRACKERS)}, or none)")  # fmt: skip
        chosen = list(getattr(namespace, self.dest))
        for name in names:
            chosen = [] if name == "none" else [*chosen, name]
        setattr(namespace, self.dest, chosen)
        namespace.overrides = [*namespace.overrides, f"tracking.report_to={chosen}"]


class _ConfigKey(argparse.Action):
    """An option that stands for one config key (`--keep-versions 3`: versions.keep=3), appended to the
    overrides so it reaches the config, config.yaml and --resume's check like any --set; the config
    validates the value (one line, exit status 2)."""

    def __init__(self, *args, key: str, folder: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.folder = folder  # a path: recorded absolute, so a --resume from elsewhere finds it

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        from .outputs.deploy import assignment  # a quoted literal: a folder named `no` or holding ": "

        value = os.path.abspath(values) if self.folder else values
        setattr(namespace, self.dest, value)
        namespace.overrides = [*namespace.overrides, assignment(self.key, value)]


VERSIONS_EPILOG = f"""adapter versions (loracl.outputs.versions): the adapter after every finished task
is kept as RUN/versions/v<k>/, its scores in RUN/versions.json; adapter/ holds the promoted one. SLAO's
adapter has a constant size, so its versions cost T x one adapter (--keep-versions N bounds that). With
--max-forgetting X, a version whose average drop on earlier tasks (the mean over j < k of a[j][j] - a[k][j],
in points, on the test sets or on the --guard-set) exceeds X is kept as a candidate, not promoted; the next
task trains on from the method's state as usual. `loracl versions RUN` lists them, `loracl promote RUN
--version K` serves another one, `loracl export RUN --version K` exports one.

exit status: 0 done; {HELD_BACK_EXIT} done, but the last version was held back (adapter/ serves an earlier
one; report.md says why); 2 bad input or a failed write (one line); 130 interrupted."""


def _versions_arguments(p: argparse.ArgumentParser) -> None:
    """--keep-versions, --max-forgetting, --guard-set: the versions.* config keys of a run."""
    p.add_argument(
        "--keep-versions",
        action=_ConfigKey,
        key="versions.keep",
        type=int,
        metavar="N",
        help="keep the folders of only the N newest adapter versions and the promoted one (versions.keep; "
        "default: all; SLAO's versions are constant-size: T x one adapter)",
    )
    p.add_argument(
        "--max-forgetting",
        action=_ConfigKey,
        key="versions.max_forgetting",
        type=float,
        metavar="X",
        help="forgetting guard: do not promote a version whose average drop on earlier tasks exceeds X "
        f"points (versions.max_forgetting); the run then exits with status {HELD_BACK_EXIT}",
    )
    p.add_argument(
        "--guard-set",
        action=_ConfigKey,
        key="versions.guard_set",
        folder=True,
        metavar="DIR",
        help="measure the drop on DIR/<task>.jsonl (one per task, lines as the jsonl benchmark's test.jsonl) "
        "instead of the test sets (versions.guard_set)",
    )


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a continual-learning sequence from a YAML config",
        description="Train on each task of a sequence in turn with a continual-learning method, evaluate on "
        "every task after each one (eval.matrix=metrics: only on those the metrics read), and write a run "
        "directory (config.yaml, results.json, report.md, matrix.png, loss.png, adapter/, versions/, "
        "versions.json, tasks/; tracking/ with --report-to).",
        epilog="Any config key can be set with --set, e.g. --set model.name=tiny-random-llama "
        "--set lora.r=16 --set benchmark.order=order2 --set method.merge=A_and_B\n\n"
        "examples:\n  loracl run configs/demo.yaml --output runs/prod --max-forgetting 5 --keep-versions 3\n"
        "  loracl run configs/demo.yaml -o runs/prod --max-forgetting 5 --guard-set data/guard\n\n"
        + VERSIONS_EPILOG,
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
        "a config given again must match it but in output_dir, model.cache_dir, eval.matrix and tracking.*)",
    )
    p.add_argument(
        "--report-to",
        dest="report_to",
        action=_ReportTo,
        default=[],
        metavar="TRACKER",
        help="also log to experiment trackers: tensorboard, wandb, mlflow, trackio (repeatable or "
        "comma-separated; none: no tracker); sets tracking.report_to; logs go under RUN_DIR/tracking/",
    )
    p.add_argument(
        "--init-adapter",
        action=_ConfigKey,
        key="lora.init_adapter",
        folder=True,
        metavar="DIR",
        help="start from this PEFT LoRA folder, as the result of a task 0 that is not evaluated (its r, "
        "alpha, target modules and base model must be the run's); sets lora.init_adapter",
    )
    _versions_arguments(p)
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from loracl.recipes.run import run

    from .config import load_config

    given = args.config is not None or args.overrides
    config = load_config(args.config, args.overrides) if given or not args.resume else None
    results = run(config, args.output, overwrite=args.overwrite, resume=args.resume)
    return HELD_BACK_EXIT if results.get("held_back") else 0  # the last version not served (versions.*)


def _add_continue(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "continue",
        help="append tasks to a finished run and learn them",
        description="Extend a run's task sequence: the method resumes from the checkpoint after the run's "
        "last task (its whole state: SLAO's merged B and task count, GPM's bases, EWC's Fisher, the replay "
        "memory, ...), learns each new task and evaluates as `loracl run` does, and the run directory is "
        "rewritten as that of the longer sequence (matrix, zero-shot scores, metrics, report, adapter/). "
        "The result is what one run over the whole sequence with the same seed gives. The new tasks come "
        "from the run's benchmark and data folder (--data-dir: the folder moved; its old tasks must be the "
        "files the run read). Interrupted, it resumes with the same command or `loracl run --resume`.",
        epilog="examples:\n"
        "  loracl run configs/demo.yaml --output runs/prod\n"
        "  loracl continue runs/prod --tasks yelp\n"
        "  loracl continue runs/prod --tasks mnli,qqp --data-dir /data/cl_benchmark\n\n"
        "Entries of the earlier rows for the new tasks are marked not evaluated (those models no longer "
        "exist), but the last old task's row, which the FWT metric reads; forgetting, which reads them for "
        "every new task but the last, is null when two or more tasks are added. Refused in one line (exit "
        "status 2, the run unchanged): a task already in the run, a "
        "--set of anything but output, cache, evaluation matrix, tracking or versions keys, a joint or "
        "untrained method, a checkpoint of another format. Exit status as `loracl run`'s (3: the last "
        "version was held back by --max-forgetting).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory (finished, or interrupted)")
    p.add_argument("--tasks", required=True, help="comma-separated names of the tasks to append, in order")
    p.add_argument(
        "--data-dir",
        action=_ConfigKey,
        key="benchmark.data_dir",
        folder=True,
        metavar="DIR",
        help="the run's data folder, if it moved",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a key a continued run may change (eval.matrix, tracking.*, model.cache_dir, ...)",
    )
    p.add_argument(
        "--report-to",
        dest="report_to",
        action=_ReportTo,
        default=[],
        metavar="TRACKER",
        help="also log to experiment trackers (as `loracl run --report-to`)",
    )
    _versions_arguments(p)
    p.set_defaults(handler=_cmd_continue)


def _cmd_continue(args: argparse.Namespace) -> int:
    from loracl.recipes.extend import continue_run

    tasks = [name.strip() for name in args.tasks.split(",")]
    results = continue_run(args.run_dir, tasks, args.overrides)
    return HELD_BACK_EXIT if results.get("held_back") else 0  # as `loracl run`


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="copy a run's final adapter, or merge it into the base model",
        description="Write the final adapter of a run to a folder: a stock PEFT LoRA for single-adapter "
        "methods such as SLAO (servable as is, e.g. by vLLM --enable-lora), the loracl multi-adapter layout "
        "for inc_lora/olora/inflora/gainlora. With --merge, write the base model with the adapter(s) added "
        "into its weights (safetensors + config + tokenizer), loadable by transformers alone. With "
        "--version K, the adapter version kept after task K (`loracl versions RUN`) instead of adapter/.",
        epilog="examples:\n  loracl export runs/tiny --to exported/tiny --merge\n"
        "  loracl export runs/prod --version 2 --to exported/prod-v2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--version", type=int, metavar="K", help="export adapter version K (versions/vK/)")
    p.add_argument(
        "--to", required=True, metavar="DIR", help="folder to create (absent or empty; outside the run)"
    )
    p.add_argument("--merge", action="store_true", help="merge the adapter(s) into the base model's weights")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export (a folder holding loracl_export.json)",
    )
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from loracl.outputs.export import export
    from loracl.outputs.versions import export_version

    if args.version is None:
        target = export(args.run_dir, args.to, merge=args.merge, overwrite=args.overwrite)
    else:
        target = export_version(args.run_dir, args.version, args.to, args.merge, args.overwrite)
    kind = "merged model (transformers folder)" if args.merge else "adapter"
    print(f"exported the {kind} to {target}")
    return 0


def _add_versions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "versions",
        help="list a run's adapter versions (one per finished task) and which one adapter/ serves",
        description="List the adapter versions of a run (RUN/versions/v<k>/, RUN/versions.json): version, "
        "task, time, AP so far (mean score on the tasks learnt up to it), drop (average drop on earlier "
        "tasks, in points, what --max-forgetting limits) and status: promoted (served: adapter/ holds it), "
        "candidate (held back by the forgetting guard) or deleted (pruned by --keep-versions).",
        epilog="examples:\n  loracl versions runs/prod\n  loracl promote runs/prod --version 3\n"
        "  loracl export runs/prod --version 3 --to exported/prod-v3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory")
    p.set_defaults(handler=_cmd_versions)


def _cmd_versions(args: argparse.Namespace) -> int:
    from loracl.outputs.versions import listing

    print(printable(listing(args.run_dir), sys.stdout))
    return 0


def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="serve another adapter version of a finished run from its adapter/",
        description="Copy adapter version K (RUN/versions/vK/) into RUN/adapter/ (atomically; the model card "
        "kept) and record it in versions.json (promoted, history), results.json (promoted_version, "
        "held_back) and report.md: overrides the forgetting guard, or rolls back to an earlier version. "
        "Takes the run directory's lock: refused while a run or another command holds it. An unknown or "
        "deleted version, or a run without versions, is refused in one line (exit status 2), nothing "
        "changed.",
        epilog="examples:\n  loracl versions runs/prod\n  loracl promote runs/prod --version 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument("--version", type=int, required=True, metavar="K", help="the version to serve")
    p.set_defaults(handler=_cmd_promote)


def _cmd_promote(args: argparse.Namespace) -> int:
    from loracl.outputs.versions import promote

    entry = promote(args.run_dir, args.version)
    print(printable(f"{args.run_dir}: adapter/ serves version {args.version} ({entry['task']})", sys.stdout))
    return 0


def _source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: the run's config, or the adapter's recorded base)")
    p.add_argument("--device", help="device to run on (default: the run's model.device)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the run's config (e.g. eval.batch_size=32); repeatable",
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a saved adapter on benchmark tasks",
        description="Evaluate the final model of a run (or an adapter folder) on the test sets of any "
        "benchmark tasks, with the run's prompt settings, and write a results JSON. Without options, the "
        "run's own benchmark and tasks.",
    )
    p.add_argument("source", metavar="ADAPTER_OR_RUN_DIR", help="a run directory or an adapter folder")
    p.add_argument("--benchmark", help="benchmark format: cl_benchmark, olora, superni, jsonl")
    p.add_argument("--order", help="a named task order (order1..order6)")
    p.add_argument("--tasks", help="comma-separated task names (overrides --order)")
    p.add_argument("--data-dir", help="benchmark data folder")
    p.add_argument("--max-test", type=int, help="cap on test examples per task")
    p.add_argument(
        "--output",
        "-o",
        help="results file (default: RUN_DIR/eval.json, or eval.json here for an adapter); an existing file "
        "is replaced only if it is an earlier eval result",
    )
    _source_arguments(p)
    p.set_defaults(handler=_cmd_eval)


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    """The benchmark options of `loracl eval` as config overrides (applied after --set). Values travel as
    quoted literals, never as YAML: `--tasks no` is the task "no", a --data-dir may hold ": "."""
    from pathlib import Path

    from loracl.data.check import detect_benchmark
    from loracl.outputs.deploy import assignment

    overrides = list(args.overrides)
    if args.benchmark is not None:
        overrides.append(assignment("benchmark.name", args.benchmark))
    if args.order is not None:
        overrides += [assignment("benchmark.order", args.order), "benchmark.tasks=null"]
    if args.tasks is not None:
        tasks = [name.strip() for name in args.tasks.split(",")]
        if not all(tasks):
            raise ConfigError(
                f"--tasks: an empty task name in {args.tasks!r}; give names separated by commas"
            )
        overrides.append(assignment("benchmark.tasks", tasks))
    if args.data_dir is not None:
        overrides.append(assignment("benchmark.data_dir", args.data_dir))
        detected = None if args.benchmark is not None else detect_benchmark(Path(args.data_dir).expanduser())
        if detected:  # another benchmark's folder than the run's: its layout says which
            overrides.append(assignment("benchmark.name", detected))
    if args.max_test is not None:
        if args.max_test <= 0:
            raise ConfigError(f"--max-test: must be a positive number of examples (got {args.max_test})")
        overrides.append(assignment("benchmark.max_test", args.max_test))
    return overrides


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loracl.engine.distributed import is_main
    from loracl.outputs.deploy import evaluate, resolve_source

    source = resolve_source(args.source, _eval_overrides(args), args.model)
    output = Path(args.output) if args.output else (source.run_dir or Path(".")) / "eval.json"
    results = evaluate(source, output, args.device)
    if is_main():
        for task, value in zip(results["tasks"], results["scores"], strict=True):
            print(f"{task}: {value:.1f}")
        print(f"average {results['average']:.1f}; results: {output}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="generate answers with a run's final model",
        description="Generate (greedy) with the final model of a run or an adapter folder; prints one JSON "
        'line {"prompt", "output"} per prompt. Prompts are formatted and truncated as in training.',
    )
    p.add_argument("source", metavar="RUN_DIR", help="a run directory (or an adapter folder)")
    p.add_argument("prompt", nargs="*", help="prompt text(s)")
    p.add_argument("--file", help='JSONL file of prompts: {"prompt": ...} objects or strings, one per line')
    p.add_argument("--max-new-tokens", type=int, help="generation cap (default: the run's eval cap)")
    _source_arguments(p)
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from loracl.engine.distributed import is_main
    from loracl.outputs.deploy import predict, read_prompts, resolve_source

    prompts = list(args.prompt) + (read_prompts(Path(args.file)) if args.file else [])
    if not prompts:
        raise ConfigError("predict: give a prompt or --file prompts.jsonl")
    source = resolve_source(args.source, args.overrides, args.model)
    answers = predict(source, prompts, args.max_new_tokens, args.device)
    if is_main():  # every process holds all the answers: print them once
        for item in answers:
            print(json.dumps(item, ensure_ascii=False))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a grid of methods x task orders and tabulate AP / BWT / FWT",
        description="Run every (method, task order) cell of a grid with the same config, one after the "
        "other or --jobs N at a time (resumable), then write DIR/bench.md (AP / BWT / FWT per cell, mean "
        "and std over orders, the paper's numbers beside ours), DIR/bench.csv (one row per cell) and "
        "DIR/bench.png (bar chart).",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config shared by every cell (omit for the defaults)")
    p.add_argument(
        "--methods",
        help="comma-separated methods (`loracl methods`); NAME:KEY=VALUE[:KEY=VALUE] gives one its options "
        "(KEY a method option) or its own config keys (KEY dotted, e.g. seq_lora:train.lr=3e-4)",
    )
    p.add_argument(
        "--orders",
        default="order1,order2,order3",
        help="comma-separated task orders: order1..order6, or task names joined by '+' "
        "(default: order1,order2,order3, the Standard CL benchmark)",
    )
    p.add_argument("--max-train", type=int, metavar="N", help="cap on training examples per task")
    p.add_argument("--max-test", type=int, metavar="N", help="cap on test examples per task")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every cell (dotted path, YAML value); repeatable",
    )
    p.add_argument("--output", "-o", default="runs/bench", help="bench directory (default: runs/bench)")
    p.add_argument("--label", help="title of the table (default: the output folder's name)")
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=1,
        metavar="N",
        help="cells run at once, each in its own process with its own copy of the model (default 1). Pays "
        "on a GPU with a small model, or a CPU with several cores (torch threads per worker: cores / N "
        "unless OMP_NUM_THREADS is set); memory grows with N. Each cell's output goes to "
        "DIR/<method>/<order>.log",
    )
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="KEY=V1,V2[;KEY=V1,V2]",
        help="select each method's value of these config keys on validation before its test runs "
        "(every combination is a candidate; see below); repeatable",
    )
    p.add_argument(
        "--select-on",
        metavar="SPLIT",
        help="what --tune selects on: only 'validation' (the default), a split carved from the training data",
    )
    p.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="repeat every cell at each train.seed (cells in DIR/<method>/<order>/seed-<s>/); the intervals "
        "then resample seeds as well as orders and test examples",
    )
    p.add_argument(
        "--report-only",
        metavar="DIR",
        help="run nothing: rebuild bench.md / .csv / .png from the cells already in DIR",
    )
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from loracl.recipes.bench import run_grid, write_bench_report

    if args.report_only:
        cells = write_bench_report(args.report_only)
    else:
        if not args.methods:
            raise ConfigError("bench: give --methods (e.g. --methods slao,seq_lora), or --report-only DIR")
        overrides = list(args.overrides)
        for key, cap in (("max_train", args.max_train), ("max_test", args.max_test)):
            if cap is not None:
                overrides.append(f"benchmark.{key}={cap}")
        cells = run_grid(
            args.config, args.methods, args.orders, overrides, args.output, args.label, args.jobs,
            args.tune, args.select_on, args.seeds,
        )
    failed = [c.where for c in cells if c.status == "failed"]
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    # The catalog, not the implementations: listing methods imports neither torch nor transformers (a
    # plugin's entry point naming its class rather than a torch-free MethodSpec imports that class's module).
    from .methods import catalog

    if args.name is not None:
        found = catalog.lookup(args.name)
        if found is None:
            raise ConfigError(catalog.unknown_method(args.name, catalog.known_names()))
        if isinstance(found, catalog.PluginFailure):
            raise ConfigError(found.line())
        print(printable(_method_details(found), sys.stdout))
        return 0
    specs, failures = catalog.listing()
    width = max(len(name) for name in [*specs, *(f.name for f in failures)]) + 1
    lines = []
    for name, spec in specs.items():
        options = ", ".join(spec.options.model_fields) or "-"
        lines.append(f"{name:<{width}} {spec.summary}")
        data_free = "yes" if spec.data_free else "no"
        growth = spec.memory_growth
        plugin = f"; plugin: {spec.origin}" if spec.origin else ""
        details = f"data-free: {data_free}; memory in T: {growth}; options: {options}{plugin}"
        lines.append(f"{'':<{width}} {details}")
    for failure in failures:  # one line each; the others are listed all the same
        lines.append(f"{failure.name:<{width}} FAILED TO LOAD ({failure.origin}): {failure.reason}")
    lines.append("\nloracl methods NAME: one method's options, with their types, defaults and meaning.")
    print(printable("\n".join(lines), sys.stdout))
    return 0


def _method_details(spec: MethodSpec) -> str:
    """`loracl methods NAME`: the method's metadata and each option's type, default and description."""
    lines = [
        f"{spec.name}: {spec.summary}",
        f"role: {spec.role.replace('_', ' ')}; data-free: {'yes' if spec.data_free else 'no'}; "
        f"memory in T: {spec.memory_growth}",
    ]
    if spec.origin:
        lines.append(f"plugin: {spec.origin} (implementation {spec.implementation})")
    if not spec.trains:
        lines.append("training: none (the base model is evaluated once)")
    elif spec.joint_training:
        lines.append("training: once, on the union of every task's data (only AP is defined)")
    if spec.merge_obstacle:
        lines.append(f"export --merge: refused ({spec.merge_obstacle})")
    fields = spec.options.model_fields
    if not fields:
        lines.append("options: none")
        return "\n".join(lines)
    where = f"method.KEY in a config, --set method.KEY=VALUE, bench --methods {spec.name}:KEY=VALUE"
    lines.append(f"options ({where}):")
    for key, field in fields.items():
        lines.append(f"  {key}: {_option_type(field)} (default: {_option_default(field)})")
        if field.description:
            lines.append(
                textwrap.fill(field.description, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(lines)


def _option_type(field: FieldInfo) -> str:
    """A pydantic field's type as a user writes its value: `float in (0, 1]`, `int > 0 or null`,
    `B | A_and_B | A | none` (the choices of a Literal)."""
    import types
    import typing

    from annotated_types import Ge, Gt, Le, Lt

    def plain(annotation) -> str:
        if typing.get_origin(annotation) is typing.Literal:
            return " | ".join(str(choice) for choice in typing.get_args(annotation))
        return getattr(annotation, "__name__", str(annotation))

    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(field.annotation) if union else (field.annotation,)
    text = " or ".join(plain(member) for member in members if member is not type(None))
    lower = upper = None
    for bound in field.metadata:
        if isinstance(bound, Gt | Ge):
            lower = ("(", bound.gt) if isinstance(bound, Gt) else ("[", bound.ge)
        elif isinstance(bound, Lt | Le):
            upper = (bound.lt, ")") if isinstance(bound, Lt) else (bound.le, "]")
    if lower and upper:
        text += f" in {lower[0]}{lower[1]}, {upper[0]}{upper[1]}"
    elif lower:
        text += f" {'>' if lower[0] == '(' else '>='} {lower[1]}"
    elif upper:
        text += f" {'<' if upper[1] == ')' else '<='} {upper[0]}"
    return f"{text} or null" if type(None) in members else text


def _option_default(field: FieldInfo) -> str:
    """A field's default as YAML would spell it (null, true, 0.57735)."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 8 else f"{value:.6g}"
    return str(value)


def _cmd_benchmarks(args: argparse.Namespace) -> int:
    from .data import ORDER_BENCHMARK, ORDERS, benchmark_names, default_order, orders_for

    print("benchmarks: " + ", ".join(benchmark_names()))
    print("orders (benchmark.order), by benchmark (jsonl, your own tasks, takes any of them):")
    for owner in dict.fromkeys(ORDER_BENCHMARK.values()):
        # The benchmarks that read `owner`'s orders (olora reads cl_benchmark's); jsonl reads every order.
        readers = [
            b
            for b in benchmark_names()
            if b != "jsonl" and ORDER_BENCHMARK.get(next(iter(orders_for(b)), "")) == owner
        ]
        default = default_order(owner) or "every task of the folder"
        print(f"  {', '.join(readers)} (default: {default}):")
        for name in (order for order, benchmark in ORDER_BENCHMARK.items() if benchmark == owner):
            print(
                textwrap.fill(
                    ", ".join(ORDERS[name]),
                    width=100,
                    initial_indent=f"    {name}: ",
                    subsequent_indent=" " * (len(name) + 6),
                )
            )
    return 0


DATA_CHECK_EPILOG = """examples:
  loracl data check ../shared/data/cl_benchmark
  loracl data check ../shared/data/cl_benchmark --order order4
  loracl data check CL_Benchmark/SuperNI --order superni1
  loracl data check LLM-CL-Benchmark --benchmark trace --order trace

Without --benchmark the benchmark is detected from the layout: <task>/{train,test,labels}.json of
{prompt, answer}: cl_benchmark; <task>/{train,eval,test}.json of {prompt, answer}: trace; <category>/<task>/
of {sentence, label}: olora; <task>/{train,dev,test}.json or <task>.json SuperNI task objects: superni;
<task>/{train,test}.jsonl: jsonl. A mixed or unknown layout needs --benchmark. Nothing is written; a bad
file, a task missing a split or an order naming an absent task is a one-line error (exit status 2)."""


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="inspect benchmark data folders",
        description="Inspect benchmark data folders.",
    )
    data_sub = p.add_subparsers(title="data commands", metavar="COMMAND", required=True)
    check = data_sub.add_parser(
        "check",
        help="validate a data folder and list its tasks",
        description="Load every task of a data folder through the loaders runs use and print the "
        "benchmark, each task's split sizes (train, dev/eval, test), label count or 'generation', and "
        "metric, and the named orders whose tasks are all present.",
        epilog=DATA_CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("folder", help="the data folder (e.g. ../shared/data/cl_benchmark)")
    check.add_argument("--benchmark", help="its format (default: detected from the layout)")
    check.add_argument("--order", help="a named order whose every task must be in the folder")
    check.set_defaults(handler=_cmd_data_check)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.check import check_folder, format_report

    report = check_folder(Path(args.folder), benchmark=args.benchmark, order=args.order)
    print(printable(format_report(report), sys.stdout))
    return 0


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="print a run's answers on a task's test examples",
        description="Print, one JSON line each, a run's answers on one task's test examples (prediction, "
        "references, score, metric), from the evaluation after its last training step, or after --step N.",
        epilog="examples:\n  loracl show runs/slao --task dbpedia --wrong\n  loracl show runs/slao --task "
        "amazon --step 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--task", required=True, help="the task's name")
    p.add_argument("--wrong", action="store_true", help="only the answers that did not score full marks")
    p.add_argument("--step", type=int, help="the evaluation after training step N (default: the last)")
    p.set_defaults(handler=_cmd_show)


def _cmd_show(args: argparse.Namespace) -> int:
    import json

    from loracl.outputs.show import show

    for record in show(args.run_dir, args.task, args.wrong, args.step):
        print(json.dumps(record, ensure_ascii=False))
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
    _add_continue(sub)
    _add_export(sub)
    _add_versions(sub)
    _add_promote(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_bench(sub)
    methods = sub.add_parser(
        "methods",
        help="list the continual-learning methods, or one method's options",
        description="List every method: what it does, whether it is data-free, how its memory grows with the "
        "number of tasks and its options. With NAME, that method's role and each option's type, default and "
        "meaning.",
        epilog="examples:\n  loracl methods\n  loracl methods slao",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    methods.add_argument("name", nargs="?", metavar="NAME", help="a method (e.g. slao): show its options")
    methods.set_defaults(handler=_cmd_methods)
    sub.add_parser(
        "benchmarks",
        help="list benchmarks and task orders",
        description="List the benchmark formats and the named task orders.",
    ).set_defaults(handler=_cmd_benchmarks)
    _add_data(sub)
    _add_show(sub)
    return parser


def printable(text: str, stream) -> str:
    """`text` as the stream can encode it: a path from the command line may hold undecodable bytes (lone
    surrogates), which would turn the one-line error into a UnicodeEncodeError traceback."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


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
        print(printable(f"{label}: {exc}", sys.stderr), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
