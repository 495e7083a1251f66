"""Evaluation: batched greedy generation (KV cache, left padding), each answer scored with its task's metric
(loracl.engine.scoring: exact match and ROUGE-L as SuperNI's compute_metrics, TRACE's own per task), or with
`eval.metric` for every task; averaged per task, in percent. The examples are each task's test split, or
with `eval.split: validation` its validation split (carved from train; the test split is then not loaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from loracl.config import RunConfig
from loracl.data import Example, Task
from loracl.data.text import PromptEncoder
from loracl.engine import distributed
from loracl.engine.interrupt import check_interrupt
from loracl.engine.progress import progress
from loracl.engine.scoring import score, strip_token


@dataclass
class TaskResult:
    score: float  # percent
    predictions: list[str]
    example_scores: list[float]  # per evaluated example, in [0, 1]


class Evaluator:
    """Generates answers for a task's test (or validation) examples and scores them."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        encoder: PromptEncoder,
        batch_size: int,
        max_new_tokens: int,
        metric: str | None = None,
        split: str = "test",
    ):
        if split not in ("test", "validation"):
            raise ValueError(f"split must be 'test' or 'validation', not {split!r}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.metric = metric  # every task's metric when set (eval.metric); else each task's own convention
        self.split = split  # which examples of a task are scored (eval.split)

    def examples(self, task: Task) -> list[Example]:
        """The examples of `task` this evaluator scores: its test or its validation split."""
        return task.validation if self.split == "validation" else task.test

    def metric_of(self, task: Task) -> str:
        return self.metric or task.metric

    def new_token_budget(self, task: Task) -> int:
        """Classification answers are short: stop after the longest label (+ end of sequence)."""
        if not task.labels:
            return self.max_new_tokens
        longest = max(len(self.encoder.answer_ids(label)) for label in task.labels)
        return min(self.max_new_tokens, longest + 1)

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, prompts: Sequence[list[int]], max_new_tokens: int
    ) -> list[str]:
        """Greedy answers to `prompts`, in their order. With several processes the batches (formed as in
        one process, so each is computed on the same padded input) are dealt out and the answers gathered
        on every process."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        mine = self._generate_batches(model, prompts, distributed.shard(batches), max_new_tokens)
        outputs: list[str] = [""] * len(prompts)
        for answers in distributed.gather_object(mine):
            for i, text in answers.items():
                outputs[i] = text
        return outputs

    def _generate_batches(
        self,
        model: torch.nn.Module,
        prompts: Sequence[list[int]],
        batches: Sequence[list[int]],
        max_new_tokens: int,
    ) -> dict[int, str]:
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id
        outputs: dict[int, str] = {}
        for rows in batches:
            check_interrupt()  # long evaluations stop between batches too
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every prompt ends at the same column
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            for r, i in enumerate(rows):
                outputs[i] = self.tokenizer.decode(generated[r, width:], skip_special_tokens=True)
        return outputs

    def evaluate(self, model: torch.nn.Module, task: Task) -> TaskResult:
        budget = self.new_token_budget(task)
        examples = self.examples(task)
        prompts = [self.encoder.prompt_ids(ex.prompt, reserve=budget)[0] for ex in examples]
        predictions = self.generate(model, prompts, budget)
        eos = self.tokenizer.eos_token
        scores = [
            score(strip_token(p, eos), ex.answers, self.metric_of(task), ex.prompt)
            for p, ex in zip(predictions, examples, strict=True)
        ]
        return TaskResult(100.0 * sum(scores) / len(scores), predictions, scores)

    def evaluate_tasks(
        self,
        model: torch.nn.Module,
        tasks: Sequence[Task],
        description: str,
        around: Callable[[int], AbstractContextManager] | None = None,
    ) -> list[TaskResult]:
        """Results per task; `around(k)`, when given, is entered around the evaluation of tasks[k] (a
        method measuring something on each task's prompts)."""
        model.eval()
        results = []
        for k, task in enumerate(progress(tasks, desc=description, unit="task")):
            with around(k) if around else contextlib.nullcontext():
                results.append(self.evaluate(model, task))
        return results

    def evaluate_all(self, model: torch.nn.Module, tasks: Sequence[Task], description: str) -> list[float]:
        return [result.score for result in self.evaluate_tasks(model, tasks, description)]


def make_evaluator(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Evaluator:
    """The prompt encoding and evaluation settings of a config (shared by runs and `loracl eval`)."""
    encoder = PromptEncoder(tokenizer, config.train.max_length, config.model.chat_template)
    e = config.eval
    return Evaluator(tokenizer, encoder, e.batch_size, e.max_new_tokens, e.metric, e.split)
