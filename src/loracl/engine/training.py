"""The training loop shared by every method. It knows no method by name: it calls the method's hooks.

Loss: causal-LM cross-entropy on the answer tokens only (prompt tokens masked). The LM head is applied only
at the answer positions, which saves the vocabulary projection of every prompt token. An encoder-decoder
(T5) reads the prompt in its encoder and is scored on its decoder's targets, the answer and eos (teacher
forcing, decoder inputs = the targets shifted right): the prompt is never among the labels.

With `train.gradient_checkpointing` the decoder layers keep only their inputs in the forward pass and run
again in the backward pass (transformers' activation checkpointing, non-reentrant), for every method alike.
The backward pass therefore runs inside the method's `step_context` too: the forward hooks of a method inside
the layers (GainLoRA's gate scaling) run again then, and must find what the step's forward found.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from loracl.config import TrainSection
from loracl.data.text import Encoded
from loracl.engine import distributed
from loracl.engine.interrupt import check_interrupt
from loracl.engine.progress import progress
from loracl.errors import ConfigError, LoraclError

IGNORE = -100


@dataclass
class TrainStats:
    steps: int
    tokens: int  # non-padding tokens processed
    seconds: float
    final_loss: float
    truncated: int  # prompts cut to fit max_length
    # per step: step, loss, lr and grad_norm (at optimizer steps, else None), tokens_per_s, elapsed
    log: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, pool_batches: int = 32
) -> list[list[int]]:
    """Shuffle, then sort by length inside pools of `pool_batches` batches, so that each batch holds
    examples of similar length (little padding) while batch order and composition stay random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(encoded: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels = -100 on prompt and padding positions (an encoder-decoder's
    examples: `collate_seq2seq`)."""
    if any(e.seq2seq for e in encoded):
        return collate_seq2seq(encoded, pad_id, device)
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, e.prompt_len : n] = input_ids[row, e.prompt_len : n]
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def collate_seq2seq(encoded: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """An encoder-decoder's batch: `input_ids` and `attention_mask` the encoder's (the prompts, right-padded),
    `labels` the decoder's targets (answer + eos, padded with -100), `decoder_attention_mask` 1 on them.
    `decoder_attention_mask` also tells a seq2seq batch from a decoder-only one (`is_seq2seq_batch`)."""
    prompts = [e.input_ids[: e.prompt_len] for e in encoded]
    answers = [e.input_ids[e.prompt_len :] for e in encoded]
    width, targets = max(map(len, prompts)), max(max(map(len, answers)), 1)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), targets), IGNORE, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        input_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        attention[row, : len(prompt)] = 1
        labels[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "decoder_attention_mask": (labels != IGNORE).long(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def is_seq2seq_batch(batch: dict[str, torch.Tensor]) -> bool:
    """Whether `batch` is an encoder-decoder's (collate_seq2seq): labels are the decoder's, not input_ids'."""
    return "decoder_attention_mask" in batch


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether `model` (a transformers model, or a PeftModel around one) is an encoder-decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_inputs(model: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """An encoder-decoder's decoder input ids for `labels`: the targets shifted right behind the decoder
    start token, -100 replaced by the pad id (the model's own `prepare_decoder_input_ids_from_labels`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.prepare_decoder_input_ids_from_labels(labels=labels)


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where the predictions that carry loss are: a decoder-only model predicts the token at t + 1 from
    position t (labels[:, 1:]), an encoder-decoder its targets in place."""
    targets = batch["labels"] if is_seq2seq_batch(batch) else batch["labels"][:, 1:]
    return targets != IGNORE


def _seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    mask = labels != IGNORE
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_inputs(model, labels),
        use_cache=False,
    ).logits
    return F.cross_entropy(logits[mask].float(), labels[mask])


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given everything before them (an encoder-decoder: given
    the prompt in the encoder and the answer tokens before them in the decoder)."""
    if is_seq2seq_batch(batch):
        return _seq2seq_loss(model, batch)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    # use_cache=False: a KV cache is of no use to a loss, and its writes could not be replayed when the layers
    # run again under gradient checkpointing
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if decoder is None or head is None:  # architectures without the split: full logits
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), targets[mask])
    hidden = decoder(**inputs).last_hidden_state
    logits = head(hidden[:, :-1][mask])
    return F.cross_entropy(logits.float(), targets[mask])


def answer_tokens(examples: Sequence[Encoded]) -> int:
    """Tokens that carry loss: the answer tokens (each is predicted from the position before it; in an
    encoder-decoder every one, the first from the decoder start token)."""
    return sum(len(e.input_ids) - (e.prompt_len if e.seq2seq else max(e.prompt_len, 1)) for e in examples)


@contextlib.contextmanager
def step_losses(
    model: torch.nn.Module,
    method,
    examples: Sequence[Encoded],
    global_tokens: int,
    pad_id: int,
    device,
    padding: Sequence[Encoded] = (),
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """This process's part of one step's loss: (task loss of its share weighted by its fraction of the
    global batch's answer tokens, extra loss / world size), so that summing over processes gives the
    one-process loss, and summing gradients the one-process gradient. None where there is nothing.

    Yielded while the method's `step_context` is still open, so that the backward pass runs inside it too
    (gradient checkpointing runs the layers' forwards, and the method's hooks in them, again there).

    `padding`: examples to run, with weight 0, when the share is empty but the processes must run the same
    passes (a sharded model, `distributed.lockstep`): the task loss is then 0 times their loss."""
    world = distributed.world_size()
    if examples:
        batch = collate(examples, pad_id, device)
        with method.step_context(model, batch):
            task = answer_loss(model, batch) * (answer_tokens(examples) / max(global_tokens, 1))
            extra = method.extra_loss(model, batch)
            yield task, None if extra is None else extra / world
    elif padding:  # an empty share of a sharded model: a pass through every block, contributing nothing
        batch = collate(padding, pad_id, device)
        with distributed.padding(), method.step_context(model, batch):
            task = answer_loss(model, batch) * 0.0
            extra = method.extra_loss(model, None)
            yield task, None if extra is None else extra / world
    else:  # more processes than examples in this step: only the parameter-only penalty is left
        extra = method.extra_loss(model, None)
        yield None, None if extra is None else extra / world


def share_loss(
    model: torch.nn.Module, method, examples: Sequence[Encoded], global_tokens: int, pad_id: int, device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`step_losses` for a caller that takes no backward pass inside the method's step context."""
    with step_losses(model, method, examples, global_tokens, pad_id, device) as losses:
        return losses


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of the trainable parameters over processes (a missing gradient counts as 0)."""
    if not distributed.active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        distributed.all_reduce_(p.grad)


def _steps(batches: list[list[int]], epochs: float, rng: random.Random, reshuffle) -> Iterator[list[int]]:
    """Batches for `epochs` passes (a fractional last pass takes a prefix of a fresh shuffle)."""
    total = max(1, round(len(batches) * epochs))
    current = batches
    for step in range(total):
        if step and step % len(batches) == 0:
            current = reshuffle()
        yield current[step % len(batches)]


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainSection, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate within one task: linear warm-up over `warmup_ratio` of its optimizer steps, then
    constant (the default, as O-LoRA's and GainLoRA's scripts run), linear or cosine decay to 0."""
    warmup = round(cfg.warmup_ratio * steps)
    if cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    return get_linear_schedule_with_warmup(optimizer, warmup, steps)


def gradient_norm(params: Sequence[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total L2 norm before clipping, clipping them to `max_norm` when one is set."""
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _checkpointing_active(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Activation ("gradient") checkpointing of the model's decoder layers inside the block, when `enabled`
    and not already on; off again after. Non-reentrant checkpointing (`use_reentrant=False`): gradients reach
    the LoRA weights of every layer, and tensors a forward hook brings into a layer (GainLoRA's gates),
    without the embeddings' outputs having to require grad (PEFT's `enable_input_require_grads` is only
    needed by reentrant checkpointing); dropout draws the same masks when a layer runs again (the RNG state
    is kept). transformers applies it in training mode only: evaluation and statistics passes (eval mode)
    run each layer once, as without it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled or _checkpointing_active(base):
        yield
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing: the model ({type(base).__name__}) does not support it; set it to "
            "false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()


class NonFiniteTraining(LoraclError):
    """The loss, or the trainable weights after an update, stopped being finite: training diverged."""


def _nonfinite_entries(params: Sequence[torch.nn.Parameter]) -> float:
    """0.0 when every trainable weight is finite, else inf (the same on every process: they hold the same
    weights after the summed update)."""
    return 0.0 if all(bool(torch.isfinite(p).all()) for p in params) else math.inf


def check_finite(value: float, what: str, description: str, step: int) -> None:
    """Stop at the first non-finite loss or update (a learning rate far too high, overflow in a low
    precision): going on would train on NaN and save a NaN adapter as if all were well."""
    if not math.isfinite(value):
        raise NonFiniteTraining(
            f"{description}, step {step}: {what}; training diverged (lower train.lr, or train in float32: "
            "model.dtype=float32)"
        )


def train_task(
    model: torch.nn.Module,
    method,
    encoded: Sequence[Encoded],
    cfg: TrainSection,
    pad_id: int,
    seed: int,
    description: str = "train",
) -> TrainStats:
    """Train the method's trainable parameters on one task's encoded examples.

    `cfg.batch_size` is the global batch: with several processes each takes its share of every batch
    (after `augment_batch`, which runs on the whole batch so that every process draws the same memory).
    With `cfg.gradient_checkpointing` the model's layers are checkpointed during the training (only)."""
    with gradient_checkpointing(model, cfg.gradient_checkpointing):
        return _train(model, method, encoded, cfg, pad_id, seed, description)


def _train(
    model: torch.nn.Module,
    method,
    encoded: Sequence[Encoded],
    cfg: TrainSection,
    pad_id: int,
    seed: int,
    description: str,
) -> TrainStats:
    device = next(model.parameters()).device
    rng = random.Random(seed)
    lengths = [len(e.input_ids) for e in encoded]

    def reshuffle() -> list[list[int]]:
        return length_bucketed_batches(lengths, cfg.batch_size, rng)

    batches = reshuffle()
    micro_steps = max(1, round(len(batches) * cfg.epochs))
    optimizer_steps = math.ceil(micro_steps / cfg.grad_accum)
    params = method.trainable_parameters(model)
    if not params:
        raise RuntimeError(f"method {method.name!r} left no trainable parameter")
    lockstep = distributed.lockstep(model)  # sharded weights: every process runs every step's passes
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, optimizer_steps)
    model.train()
    tokens, loss_value, start = 0, float("nan"), time.perf_counter()
    bar = progress(total=micro_steps, desc=description, unit="step")
    log: list[dict[str, float | None]] = []  # one record per step: TrainStats.log, the run's train_log.jsonl
    for step, batch_ids in enumerate(_steps(batches, cfg.epochs, rng, reshuffle), start=1):
        check_interrupt()  # SIGINT/SIGTERM: stop here, between two steps
        examples = method.augment_batch([encoded[i] for i in batch_ids])
        shard = distributed.shard(examples)
        padding = examples[:1] if lockstep and not shard else ()
        tokens_in_batch = answer_tokens(examples)
        with step_losses(model, method, shard, tokens_in_batch, pad_id, device, padding) as (loss, extra):
            parts = [t for t in (loss, extra) if t is not None]
            loss_value = distributed.sum_scalar(loss.item() if loss is not None else 0.0)
            objective = distributed.sum_scalar(sum(parts).item() if parts else 0.0)  # task loss + penalty
            check_finite(objective, f"the loss is {objective}", description, step)
            if parts:
                (sum(parts) / cfg.grad_accum).backward()
        method.after_backward(model)
        grad_norm = lr = None
        if step % cfg.grad_accum == 0 or step == micro_steps:
            all_reduce_gradients(params)
            method.before_optimizer_step(model)
            grad_norm = gradient_norm(params, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(model)
            check_finite(_nonfinite_entries(params), "the update left non-finite weights", description, step)
        tokens += sum(len(e.input_ids) for e in examples)
        elapsed = time.perf_counter() - start
        log.append(
            {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
             "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed": elapsed}
        )  # fmt: skip
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.update()
    bar.close()
    model.eval()
    return TrainStats(
        steps=micro_steps,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        final_loss=loss_value,
        truncated=sum(e.truncated for e in encoded),
        log=log,
    )
