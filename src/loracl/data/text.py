"""From examples to token ids: one place decides how prompts and answers are formatted and truncated,
so training and evaluation always agree.

Decoder-only models read prompt + answer as one sequence: the prompt gets what max_length leaves beside the
answer. Encoder-decoder models (T5, Flan-T5: `seq2seq`) read the prompt in the encoder, with the tokenizer's
own special tokens (T5: the closing eos), and produce the answer in the decoder: each side has max_length to
itself, and the answer carries no separator. Both keep the same truncation rules for long prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loracl.data import Example

if TYPE_CHECKING:  # a type only: importing transformers costs ~0.3 s, and scoring imports this module
    from transformers import PreTrainedTokenizerBase

ANSWER_SEPARATOR = " "  # prompts end with "Answer:"; the answer follows after one space
# Set to True on a tokenizer whose model is an encoder-decoder (loracl.models.base_model does it on loading),
# so that every PromptEncoder built on it encodes prompt and answer as two sequences.
SEQ2SEQ_MARK = "loracl_seq2seq"


def mark_seq2seq(tokenizer: PreTrainedTokenizerBase) -> None:
    """Record on `tokenizer` that its model is an encoder-decoder (see SEQ2SEQ_MARK)."""
    setattr(tokenizer, SEQ2SEQ_MARK, True)


def is_seq2seq_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    return getattr(tokenizer, SEQ2SEQ_MARK, False) is True


# Texts are cut by characters before they are tokenised, so that a 50 MB one-line prompt costs no more than a
# page: a text longer than CHARS_PER_TOKEN characters per token that can be kept loses characters that would
# be cut anyway. BPE tokenizers of LLMs average 3-5 characters per token on prose and code, and a token longer
# than 32 characters (a long run of spaces or dashes) is rare, so what is kept still tokenises to more tokens
# than fit. Texts within the bound are tokenised exactly as they are; the bound costs nothing (16K characters
# for 512 tokens).
CHARS_PER_TOKEN = 32
# What replaces the middle of a line cut to fit (a reader, or the model, sees that text is missing there).
ELISION = " ... "
# When even the whole longest line is not enough, the prompt's tokens are cut in the middle instead, keeping
# this share of the room for its head (the instruction) and the rest for its tail (the question, the options
# and the answer cue next to the answer).
HEAD_SHARE = 0.25


def _elide(line: str, keep: int) -> str:
    """`line` with its middle replaced by ELISION, keeping about `keep` characters split between its head and
    its tail, each cut at a space so that no word is split (when the line has spaces there)."""
    if keep >= len(line):
        return line
    head, tail = line[: keep // 2], line[len(line) - (keep - keep // 2) :]
    if " " in head:
        head = head[: head.rindex(" ")]
    if " " in tail:
        tail = tail[tail.index(" ") + 1 :]
    return head.rstrip() + ELISION + tail.lstrip()


@dataclass
class Encoded:
    input_ids: list[int]  # prompt + answer + eos
    prompt_len: int  # the first prompt_len tokens carry no loss
    truncated: bool  # the prompt was cut (in the middle of its longest line) to fit max_length
    # an encoder-decoder's example: the first prompt_len ids are the encoder's input, the rest the decoder's
    # targets (a class default: checkpoints written before the field read back as decoder-only examples)
    seq2seq: bool = False


class PromptEncoder:
    """Formats a prompt (raw text or the tokenizer's chat template) and tokenizes prompt/answer pairs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        chat_template: bool = False,
        seq2seq: bool | None = None,
    ):
        """`seq2seq`: encode for an encoder-decoder model (None: as the tokenizer is marked, SEQ2SEQ_MARK)."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template = chat_template and tokenizer.chat_template is not None
        self.seq2seq = is_seq2seq_tokenizer(tokenizer) if seq2seq is None else seq2seq

    def prompt_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_tokens(self, prompt: str) -> list[int]:
        """The formatted prompt's tokens; an encoder's input takes the tokenizer's special tokens (T5: eos),
        as the model was trained."""
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=self.seq2seq)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """Answer tokens and eos; an answer far beyond max_length keeps its head (see CHARS_PER_TOKEN)."""
        prefix = "" if self.chat_template or self.seq2seq else ANSWER_SEPARATOR
        return self._ids(prefix + answer[: CHARS_PER_TOKEN * self.max_length]) + [self.tokenizer.eos_token_id]

    def prompt_ids(self, prompt: str, reserve: int = 0) -> tuple[list[int], bool]:
        """Prompt tokens that leave `reserve` more tokens of max_length, and whether the prompt was cut
        (an encoder's input has max_length to itself: `reserve` is for the decoder then).

        A prompt too long loses the middle of its longest line (the passage or input text), so that its
        head (the instruction, the option list) and its tail (the question and the answer cue) stay whole:
        the model is never asked a question it cannot see. Only when the whole longest line is not enough
        are the tokens cut in the middle (HEAD_SHARE of the room for the head). A raw prompt beyond the
        character bound is first cut by characters in the same places."""
        room = max(self.max_length - (0 if self.seq2seq else reserve), 1)
        bounded = self._bounded(prompt, room)
        ids = self._prompt_tokens(bounded)
        if len(ids) <= room and bounded == prompt:
            return ids, False
        fitted = self._cut_longest_line(bounded, room)
        if fitted is not None:
            return fitted, True
        ids = self._prompt_tokens(bounded)
        head = round(HEAD_SHARE * room)
        return ids[:head] + ids[len(ids) - (room - head) :], True

    def _bounded(self, prompt: str, room: int) -> str:
        """The prompt within CHARS_PER_TOKEN characters per token of `room`, cut in its longest line."""
        excess = len(prompt) - CHARS_PER_TOKEN * room
        if excess <= 0:
            return prompt
        lines = prompt.split("\n")
        longest = max(range(len(lines)), key=lambda k: len(lines[k]))
        lines[longest] = _elide(lines[longest], max(len(lines[longest]) - excess, 0))
        bounded = "\n".join(lines)
        if len(bounded) <= CHARS_PER_TOKEN * room:
            return bounded
        keep = CHARS_PER_TOKEN * room  # many long lines: the characters' head and tail, as the tokens' below
        return prompt[: round(HEAD_SHARE * keep)] + prompt[len(prompt) - (keep - round(HEAD_SHARE * keep)) :]

    def _cut_longest_line(self, prompt: str, room: int) -> list[int] | None:
        """The tokens of `prompt` with as much of its longest line kept as fits in `room` (found by
        bisection on the characters kept), or None when the line removed whole is still too long."""
        lines = prompt.split("\n")
        longest = max(range(len(lines)), key=lambda k: len(lines[k]))

        def tokens(keep: int) -> list[int]:
            cut = [*lines[:longest], _elide(lines[longest], keep), *lines[longest + 1 :]]
            return self._prompt_tokens("\n".join(cut))

        best = tokens(0)
        if len(best) > room:
            return None
        low, high = 0, len(lines[longest]) - 1  # the largest `keep` whose tokens fit lies in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            candidate = tokens(middle)
            if len(candidate) <= room:
                low, best = middle, candidate
            else:
                high = middle - 1
        return best

    def encode(self, example: Example) -> Encoded:
        answer = self.answer_ids(example.answers[0])[: self.max_length - 1]  # never cut the answer by choice
        prompt, truncated = self.prompt_ids(example.prompt, reserve=len(answer))
        return Encoded(prompt + answer, len(prompt), truncated, seq2seq=self.seq2seq)
