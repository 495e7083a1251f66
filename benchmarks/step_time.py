"""Figure 1: training step time of SLAO in loracl's loop vs a plain PEFT LoRA step on the same batches.

SLAO trains an ordinary LoRA: its per-task work (init, merge) happens outside the steps, so a step should
cost what a plain PEFT LoRA step costs (target ratio <= 1.02). Measured:
  - slao: `loracl.engine.training.train_task` with the registered `slao` method at task 2 (after its
  orthogonal
    init), i.e. the real loop with its hooks, bucketing, clipping and scheduler;
  - peft: `get_peft_model` + torch AdamW, forward with `labels=` (Hugging Face's causal-LM loss over all
    logits), backward, step, on the very batches train_task draws (same seed, same collation);
  - peft_answer_loss: the same plain loop with loracl's answer-only loss, which isolates the cost of the
    method and the loop from the saving of the answer-only LM head.
One untimed warm-up pass each; the passes of the variants are interleaved; medians over repeats.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import torch
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
    run_main,
    slao_step_seconds,
    timed,
    with_defaults,
)
from peft import get_peft_model

from loracl.config import TrainSection
from loracl.data.text import Encoded
from loracl.engine.training import answer_loss, collate, length_bucketed_batches
from loracl.methods import create_method
from loracl.models.lora import peft_config

SIZES = {  # batch size, max length, steps per pass, timed passes
    "quick": (1, 32, 2, 1),
    "full": (2, 64, 3, 3),
}

Loss = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stock causal-LM loss: the model shifts the labels and scores every position's logits."""
    return model(**batch).loss


def plain_peft_pass(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    encoded: list[Encoded],
    batches: list[list[int]],
    pad_id: int,
    loss_fn: Loss,
) -> Callable[[], float]:
    """A function running one pass of plain LoRA steps over `batches`; returns seconds per step."""
    device = model_device(model)

    def steps() -> None:
        for ids in batches:
            loss_fn(model, collate([encoded[i] for i in ids], pad_id, device)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def one_pass() -> float:
        return timed(steps, device) / len(batches)

    return one_pass


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, help="default: 1 (quick) / 2")
    parser.add_argument("--max-length", type=int, help="default: 32 (quick) / 64")
    parser.add_argument("--steps", type=int, help="steps per timed pass; default: 2 (quick) / 3")
    parser.add_argument("--repeats", type=int, help="timed passes per variant; default: 1 (quick) / 3")
    args = parser.parse_args(argv)
    batch_size, max_length, steps, repeats = with_defaults(
        (args.batch_size, args.max_length, args.steps, args.repeats), SIZES["quick" if args.quick else "full"]
    )
    loaded = load(args)
    n = batch_size * steps
    encoded = encode_all(loaded, real_examples(args, per_task=-(-n // 4))[:n], max_length)
    cfg = TrainSection(batch_size=batch_size, max_length=max_length, seed=args.seed)
    lora = lora_section(args.rank)
    print(f"model {args.model} on {model_device(loaded.model)}: {steps} steps of batch {batch_size}, "
          f"max length {max_length}, LoRA r={args.rank} on {', '.join(lora.target_modules)}")

    slao = create_method("slao", {}, lora)
    slao_model = slao.prepare_model(copy.deepcopy(loaded.model))
    slao_pass = slao_step_seconds(slao, slao_model, loaded, encoded, cfg, args.seed)

    peft_model = get_peft_model(loaded.model, peft_config(lora))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The batches train_task draws first: the same bucketing function with the same seed.
    lengths = [len(e.input_ids) for e in encoded]
    batches = length_bucketed_batches(lengths, batch_size, random.Random(args.seed))
    pad_id = loaded.tokenizer.pad_token_id
    variants = {
        "slao": slao_pass,
        "peft": plain_peft_pass(peft_model, optimizer, encoded, batches, pad_id, hf_loss),
        "peft_answer_loss": plain_peft_pass(peft_model, optimizer, encoded, batches, pad_id, answer_loss),
    }
    for name in ("peft", "peft_answer_loss"):
        variants[name]()  # warm-up (slao was warmed up by its task-1 training)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(1, repeats + 1):
        for name, one_pass in variants.items():
            times[name].append(one_pass())
        print(f"pass {repeat}/{repeats}: " + ", ".join(f"{k} {v[-1]:.4f} s/step" for k, v in times.items()))

    step = {name: median(values) for name, values in times.items()}
    figures = {
        "slao_step_seconds": step["slao"],
        "peft_step_seconds": step["peft"],
        "peft_answer_loss_step_seconds": step["peft_answer_loss"],
        "slao_vs_peft_step_time_ratio": ratio(step["slao"], step["peft"]),
        "slao_vs_peft_same_loss_step_time_ratio": ratio(step["slao"], step["peft_answer_loss"]),
    }
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
