"""Two short tasks on the tiny random Llama, driven through a method's hooks without the runner (shared by
the method tests: test_baselines, test_parity, test_protection)."""

from __future__ import annotations

from pathlib import Path

import torch

from loracl.config import load_config
from loracl.data import load_tasks
from loracl.data.text import PromptEncoder
from loracl.engine.training import train_task
from loracl.methods import create_method
from loracl.methods.context import TaskContext
from loracl.models.base_model import tiny_random_llama

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SHORT = ["benchmark.tasks=[agnews,yelp]", "eval.zero_shot=false", "benchmark.max_train=8", "train.lr=1e-2"]
LAYER0 = "base_model.model.model.layers.0.self_attn.q_proj"  # its inputs do not depend on any LoRA


def setup(method_name: str, options: dict, tmp_path: Path, overrides: tuple[str, ...] = ()):
    """Config, method, prepared model and one TaskContext per task (agnews, then yelp, 8 examples each)."""
    torch.manual_seed(0)  # the gates and LoRA inits draw from the global generator: same draw in any order
    config = load_config(TINY, [*SHORT, *overrides])
    tasks = load_tasks(config)
    base, tokenizer = tiny_random_llama()
    method = create_method(method_name, options, config.lora)
    model = method.prepare_model(base)
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    contexts = [
        TaskContext(
            i,
            t,
            tmp_path / str(i),
            [encoder.encode(ex) for ex in t.train],
            tokenizer.pad_token_id,
            torch.device("cpu"),
            config.train.batch_size,
            0,
        )
        for i, t in enumerate(tasks, start=1)
    ]
    for ctx in contexts:
        ctx.task_dir.mkdir(parents=True, exist_ok=True)
    return config, method, model, contexts


def learn(config, method, model, ctx) -> None:
    """One task through the hooks: before_task, training, after_task."""
    method.before_task(model, ctx)
    train_task(model, method, ctx.encoded, config.train, ctx.pad_id, seed=ctx.index)
    method.after_task(model, ctx)


def generation_logits(
    model, tokenizer, prompts: list[list[int]], steps: int = 3, pad_left: bool = True
) -> tuple[torch.Tensor, ...]:
    """Greedy generation with the KV cache of `steps` tokens: (ids, mask, sequences, logits per step).
    Prompts are padded on the left (a decoder-only model) or, with pad_left False, on the right (an
    encoder's input, as the evaluator pads it)."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id

    def padded(p: list[int], fill: int) -> list[int]:
        extra = [fill] * (width - len(p))
        return extra + p if pad_left else p + extra

    ids = torch.tensor([padded(p, pad) for p in prompts])
    mask = torch.tensor([padded([1] * len(p), 0) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
    return ids, mask, out.sequences, torch.stack(out.logits, dim=1)
