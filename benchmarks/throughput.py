"""Figure 4: training tokens/s of loracl vs Trainer + PEFT; evaluation examples/s, LoRA merged vs unmerged.

The baseline is a plain Hugging Face `Trainer` + PEFT fine-tune; merged means `merge_adapter()`.

Training, on the same tokens (real prompts of the Standard CL order 1, encoded once by loracl's
PromptEncoder, so the truncation is identical), model, LoRA, batch size, learning rate and max length:
  - loracl: `loracl.engine.training.train_task` with the `slao` method (task 1: a plain LoRA), which buckets
    examples by length and applies the LM head to the answer tokens only;
  - Trainer: `transformers.Trainer` on a `get_peft_model` LoRA, its default random batches, padded per batch
    by the stock `DataCollatorForSeq2Seq` (labels padded with -100, prompt tokens -100 as in loracl).
Throughput = non-padding tokens / wall seconds of the training call, one untimed warm-up each, medians over
passes. Evaluation: `loracl.engine.evaluation.Evaluator` (batched greedy generation) on the test
prompts, examples
per second, with the PEFT model as is (unmerged) and after `merge_adapter()`.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence

from cost_common import (
    base_parser,
    encode_all,
    load,
    lora_section,
    median,
    model_device,
    print_figures,
    ratio,
    real_examples,
    real_tasks,
    run_main,
    scratch_dir,
    synchronize,
    timed,
    with_defaults,
)
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from loracl.config import TrainSection
from loracl.data.text import Encoded, PromptEncoder
from loracl.engine.evaluation import Evaluator
from loracl.engine.training import IGNORE, length_bucketed_batches, train_task
from loracl.methods import create_method
from loracl.models.base_model import LoadedModel
from loracl.models.lora import peft_config

SIZES = {  # train examples per task, batch size, max length, timed passes, test examples per task
    "quick": (1, 2, 48, 1, 1),
    "full": (3, 4, 128, 2, 4),
}


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padding in the batches when each is padded to its longest example."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1.0 - sum(lengths[i] for batch in batches for i in batch) / padded


def random_batches(count: int, batch_size: int, seed: int) -> list[list[int]]:
    """Batches as a random sampler draws them: one shuffle, cut in order."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def trainer_features(encoded: Sequence[Encoded]) -> list[dict[str, list[int]]]:
    """The same tokens as loracl trains on, as a Trainer dataset (loss on the answer tokens only)."""
    return [
        {
            "input_ids": e.input_ids,
            "attention_mask": [1] * len(e.input_ids),
            "labels": [IGNORE] * e.prompt_len + e.input_ids[e.prompt_len :],
        }
        for e in encoded
    ]


class StepClock(TrainerCallback):
    """Wall time from the start of the first training step to the end of the last one: the Trainer's set-up
    (accelerator, data loader, optimizer) is left out, which can only favour the Trainer."""

    def __init__(self, device) -> None:
        self.device = device
        self.start: float | None = None
        self.end = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.start is None:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - (self.start or self.end)


def trainer_seconds(model, loaded: LoadedModel, features: list[dict], cfg: TrainSection, max_steps: int = -1):
    """Seconds of the training steps of one `Trainer.train()` over the features (max_steps > 0: stop early,
    for warm-up)."""
    device = model_device(model)
    arguments = TrainingArguments(
        output_dir=str(scratch_dir("trainer")),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=1,
        max_steps=max_steps,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding=True, label_pad_token_id=IGNORE)
    clock = StepClock(device)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=features, data_collator=collator, callbacks=[clock]
    )
    trainer.train()
    return clock.seconds


def training_figures(args, loaded: LoadedModel, encoded: list[Encoded], cfg: TrainSection, passes: int):
    """loracl's and the Trainer's tokens per second on the same tokens; returns (figures, trained model)."""
    lora = lora_section(args.rank)
    trainer_model = get_peft_model(copy.deepcopy(loaded.model), peft_config(lora))
    method = create_method("slao", {}, lora)
    model = method.prepare_model(loaded.model)
    tokens = sum(len(e.input_ids) for e in encoded)
    features = trainer_features(encoded)
    pad_id = loaded.tokenizer.pad_token_id
    train_task(model, method, encoded[: cfg.batch_size], cfg, pad_id, args.seed)  # warm-up
    trainer_seconds(trainer_model, loaded, features, cfg, max_steps=1)  # warm-up
    rates: dict[str, list[float]] = {"loracl": [], "trainer": []}
    for index in range(1, passes + 1):
        stats = train_task(model, method, encoded, cfg, pad_id, args.seed)
        rates["loracl"].append(stats.tokens / stats.seconds)
        rates["trainer"].append(tokens / trainer_seconds(trainer_model, loaded, features, cfg))
        print(f"pass {index}/{passes}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()))
    lengths = [len(e.input_ids) for e in encoded]
    bucketed = length_bucketed_batches(lengths, cfg.batch_size, random.Random(args.seed))
    loracl_rate, trainer_rate = median(rates["loracl"]), median(rates["trainer"])
    figures = {
        "loracl_train_tokens_per_s": loracl_rate,
        "trainer_train_tokens_per_s": trainer_rate,
        "loracl_vs_trainer_throughput_ratio": ratio(loracl_rate, trainer_rate),
        "loracl_padding_fraction": padding_fraction(lengths, bucketed),
        "random_batches_padding_fraction": padding_fraction(
            lengths, random_batches(len(lengths), cfg.batch_size, args.seed)
        ),
    }
    return figures, model


def eval_figures(args, loaded: LoadedModel, model, cfg: TrainSection, per_task: int, passes: int):
    """Examples per second of the real evaluator, LoRA unmerged vs merged into the base weights."""
    tasks = real_tasks(args, per_task)
    encoder = PromptEncoder(loaded.tokenizer, cfg.max_length)
    evaluator = Evaluator(loaded.tokenizer, encoder, batch_size=args.eval_batch_size, max_new_tokens=32)
    device = model_device(model)
    examples = sum(len(t.test) for t in tasks)

    def evaluate() -> float:
        return examples / timed(lambda: evaluator.evaluate_all(model, tasks, "eval"), device)

    evaluator.evaluate(model, tasks[0])  # warm-up
    rates: dict[str, list[float]] = {"unmerged": [], "merged": []}
    for _ in range(passes):
        rates["unmerged"].append(evaluate())
        model.merge_adapter()
        rates["merged"].append(evaluate())
        model.unmerge_adapter()
    unmerged, merged = median(rates["unmerged"]), median(rates["merged"])
    print(f"eval on {examples} examples: unmerged {unmerged:.2f}/s, merged {merged:.2f}/s")
    return {
        "eval_unmerged_examples_per_s": unmerged,
        "eval_merged_examples_per_s": merged,
        "eval_merged_vs_unmerged_speedup": ratio(merged, unmerged),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--train-per-task", type=int, help="train examples per task; default 1 (quick) / 3")
    parser.add_argument("--batch-size", type=int, help="default: 2 (quick) / 4")
    parser.add_argument("--max-length", type=int, help="default: 48 (quick) / 128")
    parser.add_argument("--passes", type=int, help="timed passes; default: 1 (quick) / 2")
    parser.add_argument("--test-per-task", type=int, help="test examples per task; default: 1 (quick) / 4")
    args = parser.parse_args(argv)
    per_task, batch_size, max_length, passes, test_per_task = with_defaults(
        (args.train_per_task, args.batch_size, args.max_length, args.passes, args.test_per_task),
        SIZES["quick" if args.quick else "full"],
    )
    loaded = load(args)
    cfg = TrainSection(batch_size=batch_size, max_length=max_length, seed=args.seed)
    encoded = encode_all(loaded, real_examples(args, per_task), max_length)
    print(f"model {args.model} on {model_device(loaded.model)}: {len(encoded)} examples, "
          f"{sum(len(e.input_ids) for e in encoded)} tokens, batch {batch_size}, max length {max_length}")
    figures, model = training_figures(args, loaded, encoded, cfg, passes)
    figures |= eval_figures(args, loaded, model, cfg, test_per_task, passes)
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
