"""From examples to token ids: one place decides how prompts and answers are formatted and truncated,
so training and evaluation always agree."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from loracl.data import Example

ANSWER_SEPARATOR = " "  # prompts end with "Answer:"; the answer follows after one space

# Texts are cut by characters before they are tokenised, so that a 50 MB one-line prompt costs no more than a
# page: a text longer than CHARS_PER_TOKEN characters per token that can be kept loses the part that would be
# cut anyway. BPE tokenizers of LLMs average 3-5 characters per token on prose and code, and a token longer
# than 32 characters (a long run of spaces or dashes) is rare, so the kept part still tokenises to more tokens
# than fit, and the tokens kept are those the whole text gives (the cut lies well before them). Texts within
# the bound are tokenised exactly as before; the bound costs nothing (16K characters for 512 tokens).
CHARS_PER_TOKEN = 32


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
        """Answer tokens and eos; an answer far beyond max_length keeps its head (see CHARS_PER_TOKEN)."""
        prefix = "" if self.chat_template else ANSWER_SEPARATOR
        return self._ids(prefix + answer[: CHARS_PER_TOKEN * self.max_length]) + [self.tokenizer.eos_token_id]

    def prompt_ids(self, prompt: str, reserve: int = 0) -> tuple[list[int], bool]:
        """Prompt tokens, cut on the left so that `reserve` more tokens still fit in max_length.

        Cutting on the left keeps the end of the prompt (the question and `Answer:`) next to the answer. The
        raw prompt is cut by characters first (before a chat template, which only adds tokens around it)."""
        room = max(self.max_length - reserve, 1)
        keep = CHARS_PER_TOKEN * room
        cut = len(prompt) > keep
        ids = self._ids(self.prompt_text(prompt[-keep:] if cut else prompt))
        return (ids[-room:], True) if cut or len(ids) > room else (ids, False)

    def encode(self, example: Example) -> Encoded:
        answer = self.answer_ids(example.answers[0])[: self.max_length - 1]  # never cut the answer by choice
        prompt, truncated = self.prompt_ids(example.prompt, reserve=len(answer))
        return Encoded(prompt + answer, len(prompt), truncated)
