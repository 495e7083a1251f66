"""Encoder-decoder models (T5, Flan-T5) on the tiny random T5: loading, the seq2seq encoding and loss,
generation, input statistics of both stacks, GainLoRA's encoder gate, every method end to end through
loracl.recipes.run.run, and the exported adapter reloaded onto the T5 base."""

from __future__ import annotations

import json

import pytest
import torch
from method_helpers import ROOT, SHORT, generation_logits
from peft import PeftModel
from safetensors.torch import load_file
from transformers import T5ForConditionalGeneration

from loracl.config import LoraSection, load_config
from loracl.data import Example, load_tasks
from loracl.data.text import ELISION, PromptEncoder
from loracl.engine.evaluation import Evaluator
from loracl.engine.training import IGNORE, answer_loss, collate, decoder_inputs, train_task
from loracl.errors import ConfigError
from loracl.methods import available_methods, create_method
from loracl.methods.context import TaskContext
from loracl.methods.gainlora import masked_mean
from loracl.models.base_model import load_model, tiny_random_t5
from loracl.models.lora import attach_lora, check_lora_targets, lora_layers
from loracl.models.subspace import collect_input_grams
from loracl.outputs.export import export
from loracl.outputs.loading import load_adapter
from loracl.recipes import run as runner

TINY_T5 = ROOT / "configs" / "tiny-t5.yaml"
PROMPTS = ["Is this positive?\nGreat food.\nAnswer:", "Topic?\nStocks fell sharply today on news.\nAnswer:"]
ANSWERS = ["yes", "Business news"]


def encoded_examples(tokenizer, max_length: int = 64):
    encoder = PromptEncoder(tokenizer, max_length)
    return encoder, [encoder.encode(Example(p, (a,))) for p, a in zip(PROMPTS, ANSWERS, strict=True)]


# -- loading ---------------------------------------------------------------------------------------------
def test_tiny_t5_is_a_deterministic_encoder_decoder_built_without_downloads():
    a, b = load_model("tiny-random-t5", device="cpu"), load_model("tiny-random-t5", device="cpu")
    assert isinstance(a.model, T5ForConditionalGeneration) and a.model.config.is_encoder_decoder
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    config, tokenizer = a.model.config, a.tokenizer
    assert config.pad_token_id == tokenizer.pad_token_id == config.decoder_start_token_id
    assert config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    assert PromptEncoder(tokenizer, 32).seq2seq and a.path == "tiny-random-t5"


def test_a_t5_folder_loads_as_a_seq2seq_model(tmp_path):
    """A local (or hub) encoder-decoder used to fail in AutoModelForCausalLM; it loads through
    AutoModelForSeq2SeqLM, its tokenizer marked so that prompts go to the encoder."""
    model, tokenizer = tiny_random_t5()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert isinstance(loaded.model, T5ForConditionalGeneration)
    assert PromptEncoder(loaded.tokenizer, 32).seq2seq
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_q_v_targets_default_per_architecture_and_all_linear_is_accepted():
    model, _ = tiny_random_t5()
    default = LoraSection(r=4)  # [q_proj, v_proj]: the query and value projections, named as T5 names them
    check_lora_targets(model, default)
    adapted = [name for name, _ in lora_layers(attach_lora(model, default))]
    assert len(adapted) == 2 * 2 + 2 * 4  # encoder: self q, v; decoder: self q, v and cross q, v; 2 blocks
    assert all(name.endswith((".q", ".v")) for name in adapted)
    assert any(".EncDecAttention." in name for name in adapted) and any(
        ".encoder." in name for name in adapted
    )
    model, _ = tiny_random_t5()
    every = LoraSection(r=4, target_modules=["all-linear"])
    check_lora_targets(model, every)
    adapted = {name.rpartition(".")[2] for name, _ in lora_layers(attach_lora(model, every))}
    assert adapted == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}  # everything but the head
    with pytest.raises(ConfigError, match="no layer named 'q_proj'"):
        check_lora_targets(tiny_random_t5()[0], LoraSection(target_modules=["q_proj"]))


# -- encoding, loss, generation ----------------------------------------------------------------------------
def test_prompt_and_answer_are_encoded_apart():
    _, tokenizer = tiny_random_t5()
    encoder, (first, _) = encoded_examples(tokenizer)
    assert first.seq2seq and not first.truncated
    prompt = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert first.input_ids[: first.prompt_len] == prompt
    assert first.input_ids[first.prompt_len :] == [*tokenizer("yes")["input_ids"], tokenizer.eos_token_id]
    assert encoder.answer_ids("yes")[0] == tokenizer("yes")["input_ids"][0]  # no separator before the answer


def test_long_prompts_lose_the_middle_of_their_longest_line_and_keep_max_length_to_themselves():
    _, tokenizer = tiny_random_t5()
    encoder = PromptEncoder(tokenizer, 48)
    prompt = "Classify the review.\n" + "word " * 200 + "end\nAnswer:"
    encoded = encoder.encode(Example(prompt, ("a long answer " * 2,)))
    kept = tokenizer.decode(encoded.input_ids[: encoded.prompt_len])
    assert encoded.truncated and ELISION.strip() in kept
    assert kept.startswith("Classify the review.\n") and kept.endswith("end\nAnswer:")
    assert (
        40 <= encoded.prompt_len <= 48
    )  # the encoder's input: the answer (29 tokens) takes none of its room
    assert encoder.prompt_ids(prompt, reserve=30)[0] == encoded.input_ids[: encoded.prompt_len]


def test_the_loss_is_on_the_answer_tokens_only():
    model, tokenizer = tiny_random_t5()
    _, examples = encoded_examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    for row, e in enumerate(examples):  # encoder: the prompt; labels: the answer + eos, -100 after it
        answer = e.input_ids[e.prompt_len :]
        assert batch["input_ids"][row, : e.prompt_len].tolist() == e.input_ids[: e.prompt_len]
        assert batch["attention_mask"][row].sum() == e.prompt_len
        assert batch["labels"][row, : len(answer)].tolist() == answer
        assert (batch["labels"][row, len(answer) :] == IGNORE).all()
    loss = answer_loss(model, batch)
    reference = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    torch.testing.assert_close(loss, reference.loss)  # HF's own seq2seq loss: mean over the target tokens
    # a hand-computed check: the sum of the targets' negative log-probabilities, teacher-forced
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_inputs(model, batch["labels"]),
    ).logits.log_softmax(-1)
    mask = batch["labels"] != IGNORE
    picked = logits.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    torch.testing.assert_close(loss, -picked.mean())


def greedy_by_hand(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding without cache or padding, one full forward per token."""
    ids, out = torch.tensor([prompt]), [model.config.decoder_start_token_id]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out[1:]


def test_generation_returns_only_the_new_text():
    model, tokenizer = tiny_random_t5()
    encoder, _ = encoded_examples(tokenizer)
    prompts = [encoder.prompt_ids(p)[0] for p in PROMPTS]  # of different lengths: padding in the batch
    evaluator = Evaluator(tokenizer, encoder, batch_size=2, max_new_tokens=5)
    got = evaluator.generate(model.eval(), prompts, 5)
    expected = [
        tokenizer.decode(greedy_by_hand(model, p, 5, tokenizer.eos_token_id), skip_special_tokens=True)
        for p in prompts
    ]
    assert got == expected and any(got)
    assert not any(PROMPTS[0][:10] in text for text in got)


# -- input statistics --------------------------------------------------------------------------------------
def captured_inputs(model, layers, batch, labels):
    """Every layer's input of one full forward (encoder and decoder), by layer name."""
    seen = {}
    handles = [
        m.register_forward_hook(lambda _m, args, _o, name=name: seen.__setitem__(name, args[0].detach()))
        for name, m in layers.items()
    ]
    with torch.no_grad():
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_inputs(model, labels),
        )
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("answers", [ANSWERS, ["Positive and a much longer answer here", "no"]])
def test_input_grams_cover_both_stacks_with_their_own_masks(answers):
    """Encoder layers (and cross-attention v, which reads the encoder's output) keep the encoder's
    non-padding tokens, decoder layers the target tokens. The second case has decoder targets as long as the
    encoder input, where only the extra masked position tells the two apart."""
    base, tokenizer = tiny_random_t5()
    model = attach_lora(base, LoraSection(r=4, target_modules=["q", "v"]))
    for name, p in model.named_parameters():  # LoRA outputs that matter, so the inputs are not trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    encoder = PromptEncoder(tokenizer, 64)
    examples = [encoder.encode(Example(p, (a,))) for p, a in zip(PROMPTS, answers, strict=True)]
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    layers = dict(lora_layers(model))
    grams = collect_input_grams(model, layers, [batch])
    labels = batch["labels"]
    if labels.shape[1] == batch["input_ids"].shape[1]:
        labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)
    inputs = captured_inputs(model, layers, batch, labels)
    encoder_mask, decoder_mask = batch["attention_mask"].bool(), labels != IGNORE
    assert int(encoder_mask.sum()) == sum(e.prompt_len for e in examples)
    assert int(decoder_mask.sum()) == sum(len(e.input_ids) - e.prompt_len for e in examples)
    assert int(encoder_mask.sum()) != int(decoder_mask.sum())
    stacks = set()
    for name, x in inputs.items():
        encoder_side = ".encoder." in name or name.endswith("EncDecAttention.v")
        mask = encoder_mask if encoder_side else decoder_mask
        rows = x[mask].double()
        assert rows.shape[0] == int(mask.sum()), name
        torch.testing.assert_close(grams[name].double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
        stacks.add("encoder" if ".encoder." in name else "decoder")
    assert stacks == {"encoder", "decoder"} and len(grams) == 12


# -- GainLoRA's gate ---------------------------------------------------------------------------------------
def gainlora_on_t5(tmp_path):
    torch.manual_seed(0)
    config = load_config(TINY_T5, SHORT)
    task = load_tasks(config)[0]
    base, tokenizer = tiny_random_t5()
    method = create_method("gainlora", {}, config.lora)
    model = method.prepare_model(base)
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    encoded = [encoder.encode(ex) for ex in task.train]
    ctx = TaskContext(1, task, tmp_path, encoded, tokenizer.pad_token_id, torch.device("cpu"), 4, 0)
    method.before_task(model, ctx)
    return config, method, model, tokenizer, ctx


def test_the_gate_pools_the_encoder_embeddings_over_the_prompt(tmp_path):
    config, method, model, tokenizer, ctx = gainlora_on_t5(tmp_path)
    bank = method.bank(model)
    batch = next(ctx.batches())
    embed = model.get_base_model().get_input_embeddings()
    expected = bank(masked_mean(embed(batch["input_ids"]), batch["attention_mask"])).detach()
    seen = []
    handle = (
        model.get_base_model()
        .get_decoder()
        .register_forward_pre_hook(lambda *_: seen.append(bank.current.detach().clone()))
    )
    with torch.no_grad(), method.step_context(model, batch):
        answer_loss(
            model, batch
        )  # a training step's forward: the gates are the encoder's, before the decoder
    handle.remove()
    torch.testing.assert_close(seen[0], expected)
    assert 0 < float(expected.mean()) <= 1
    # the statistics pass pools exactly what the gate reads: the prompt's embeddings
    torch.testing.assert_close(
        method.gate_inputs(model, ctx)[: len(batch["input_ids"])],
        masked_mean(embed(batch["input_ids"]), batch["attention_mask"]).detach(),
    )
    train_task(model, method, ctx.encoded, config.train, ctx.pad_id, seed=1)  # trains through the hooks
    method.after_task(model, ctx)
    assert method.task_info()["gate_own_mean"] > 0


def t5_generation(model, tokenizer, prompts: list[list[int]], steps: int = 3):
    """Right-padded prompts (as the evaluator pads an encoder's input), greedy with the KV cache."""
    return generation_logits(model, tokenizer, prompts, steps, pad_left=False)


def test_gainlora_cached_generation_equals_teacher_forced_scoring(tmp_path):
    """The encoder runs once per generate call: the gates it computes serve every cached decoding step, and
    equal those of a teacher-forced forward over the same prompt."""
    _, method, model, tokenizer, ctx = gainlora_on_t5(tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # large branches so that the gates change the logits visibly
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    bank = method.bank(model)
    model.eval()
    prompts = [list(range(40, 60)), list(range(70, 82))]
    bank.recorded = []
    ids, mask, sequences, logits = t5_generation(model, tokenizer, prompts)
    assert len(bank.recorded) == 1  # one gate computation for the whole generate call
    bank.recorded = None
    with torch.no_grad(), bank.prompt_only(mask):
        forced = model(input_ids=ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
    torch.testing.assert_close(forced, logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), bank.prompt_only(torch.ones_like(mask)):  # gates pooled over the padding too
        padded = model(input_ids=ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
    assert (padded - logits).abs().max() > 1e-3


# -- every method end to end -------------------------------------------------------------------------------
# Every method: about a second each on the tiny T5 (~15 s for all of them).
METHODS = [
    "seq_lora", "slao", "inc_lora", "olora", "inflora", "gpm", "gainlora", "ewc", "replay", "agem", "magmax",
    "task_arithmetic", "ties", "mtl", "zero_shot",
]  # fmt: skip


def test_every_method_is_covered():
    assert set(available_methods()) == set(METHODS)


@pytest.fixture(scope="module", params=METHODS)
def finished(request, tmp_path_factory):
    """A 2-task run on the tiny T5 through loracl.recipes.run.run, with the in-memory model kept."""
    kept = {}
    original = runner.ContinualRun.finish

    def finish(self, wall_seconds):
        kept["model"] = self.model
        return original(self, wall_seconds)

    out = tmp_path_factory.mktemp("t5") / request.param
    config = load_config(TINY_T5, [*SHORT, f"method.name={request.param}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.ContinualRun, "finish", finish)
        results = runner.run(config, out)
    return request.param, config, results, out, kept["model"]


def adapter_configs(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("adapter_config.json"))]


def test_every_method_runs_on_t5(finished):
    name, config, results, out, model = finished
    assert results["complete"] and results["method"] == name and len(results["matrix"]) == 2
    assert all(0.0 <= v <= 100.0 for row in results["matrix"] for v in row)
    configs = adapter_configs(out / "adapter")
    assert configs and all(c["task_type"] == "SEQ_2_SEQ_LM" for c in configs)
    assert all(sorted(c["target_modules"]) == ["q", "v"] for c in configs)
    assert sorted(results["lora_targets"]) == ["q", "v"]  # what was adapted, not the config's default names
    assert " on q, v;" in (out / "report.md").read_text()  # the report's setup line says the same
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any(".encoder." in n for n in names) and any(".EncDecAttention." in n for n in names)
    logs = sorted((out / "tasks").glob("*/train_log.jsonl"))
    assert len(logs) == (0 if name == "zero_shot" else 1 if name == "mtl" else 2)
    for path in logs:
        losses = [json.loads(line)["loss"] for line in path.open()]
        assert losses and all(0 < loss < 100 for loss in losses), path


def test_the_exported_adapter_reloads_onto_the_t5_base_and_reproduces_the_run(finished):
    name, config, results, out, model = finished
    base, tokenizer = tiny_random_t5()
    loaded = load_adapter(out / "adapter", base)
    assert isinstance(loaded, PeftModel) and not any(p.requires_grad for p in loaded.parameters())
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    tasks = load_tasks(config)
    prompts = [encoder.prompt_ids(ex.prompt)[0] for ex in tasks[0].test[:3]]
    *_, expected = t5_generation(model, tokenizer, prompts)
    *_, got = t5_generation(loaded, tokenizer, prompts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if name != "zero_shot":
        with model.disable_adapter():
            *_, plain = t5_generation(model, tokenizer, prompts)
        assert (plain - expected).abs().max() > 1e-5  # the adapters matter, so the comparison means something
    evaluator = Evaluator(tokenizer, encoder, config.eval.batch_size, config.eval.max_new_tokens)
    outcomes = evaluator.evaluate_tasks(loaded, tasks, "check")
    assert [o.score for o in outcomes] == pytest.approx(results["matrix"][-1])
    last = sorted(out.glob("tasks/*/predictions.jsonl"))[-1]  # the final model's evaluation
    recorded = [json.loads(line)["prediction"] for line in last.open()]
    assert [p for o in outcomes for p in o.predictions] == recorded


@pytest.mark.parametrize("finished", ["slao"], indirect=True)  # one single-LoRA method is enough
def test_export_merge_writes_a_t5_that_scores_as_the_run(finished, tmp_path):
    name, config, results, out, model = finished
    merged_dir = export(out, tmp_path / "merged", merge=True)
    merged = load_model(str(merged_dir), dtype="float32", device="cpu")
    assert isinstance(merged.model, T5ForConditionalGeneration)
    prompts = [list(range(40, 60)), list(range(70, 82))]
    *_, expected = t5_generation(model, merged.tokenizer, prompts)
    *_, got = t5_generation(merged.model, merged.tokenizer, prompts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- resume ------------------------------------------------------------------------------------------------
class SimulatedCrash(Exception):
    pass


def adapter_tensors(run_dir):
    return {
        str(f.relative_to(run_dir)): load_file(str(f))
        for f in sorted(run_dir.glob("adapter/**/*.safetensors"))
    }


@pytest.mark.parametrize("method", ["gainlora", "replay"])  # seq2seq adapters + gates; seq2seq examples kept
def test_a_t5_run_crashed_mid_task_resumes_to_the_uninterrupted_result(method, tmp_path, monkeypatch):
    config = load_config(TINY_T5, [*SHORT, f"method.name={method}"])
    whole = runner.run(config, tmp_path / "whole")
    real = runner.train_task

    def crash(model) -> None:
        raise SimulatedCrash

    def train_task(model, method, *args, **kwargs):  # crash after task 2's first optimizer step
        if kwargs["description"].startswith("task 2/"):
            method.after_optimizer_step = crash
        return real(model, method, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(SimulatedCrash):
        patch.setattr(runner, "train_task", train_task)
        runner.run(config, tmp_path / "crashed")
    resumed = runner.run(config, tmp_path / "crashed", resume=True)
    assert resumed["matrix"] == whole["matrix"] and resumed["resumed_after"] == [1]
    assert [t["final_loss"] for t in resumed["per_task"]] == [t["final_loss"] for t in whole["per_task"]]
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "crashed")
    assert a.keys() == b.keys() and a
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
