"""From examples to token ids: one place decides how prompts and answers are formatted and truncated,
so training and evaluation always agree."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from loracl.data import Example

ANSWER_SEPARATOR = " "  # prompts end with "Answer:"; the answer follows after one space


@dataclass
class Encoded:
    input_ids: list[int]  # prompt + answer + eos
    prompt_len: int  # the first prompt_len tokens carry no loss
    truncated: bool  # the prompt was cut on the left to fit max_length


class PromptEncoder:
    """Formats a prompt (raw text or the tokenizer's chat template) and tokenizes prompt/answer pairs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template = chat_template and tokenizer.chat_template is not None

    def prompt_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        prefix = "" if self.chat_template else ANSWER_SEPARATOR
        return self._ids(prefix + answer) + [self.tokenizer.eos_token_id]

    def prompt_ids(self, prompt: str, reserve: int = 0) -> tuple[list[int], bool]:
        """Prompt tokens, cut on the left so that `reserve` more tokens still fit in max_length.

        Cutting on the left keeps the end of the prompt (the question and `Answer:`) next to the answer."""
        ids = self._ids(self.prompt_text(prompt))
        room = max(self.max_length - reserve, 1)
        return (ids[-room:], True) if len(ids) > room else (ids, False)

    def encode(self, example: Example) -> Encoded:
        answer = self.answer_ids(example.answers[0])[: self.max_length - 1]  # never cut the answer by choice
        prompt, truncated = self.prompt_ids(example.prompt, reserve=len(answer))
        return Encoded(prompt + answer, len(prompt), truncated)
