"""Old-task protection measured, not assumed: train task 1 (agnews) then task 2 (yelp) on the tiny random
Llama and measure how far the model's outputs on task 1's inputs moved while it learned task 2, for each
method that promises to protect old tasks, against seq_lora (one LoRA, no protection) on the same data and
settings.

Outputs: the log-probabilities over the vocabulary at the answer positions of a task's 8 training examples,
teacher-forced (GainLoRA's gates pool over the prompt, through its step_context, as in generation). With o0,
o1, o2 those of the model before any task, after task 1 and after task 2, on task 1's (X1) or task 2's (X2)
inputs:
  drift  = |o2(X1) - o1(X1)| / |o1(X1) - o0(X1)|  old outputs' move, relative to what task 1 had taught;
  leak   = |o2(X1) - o1(X1)| / |o2(X2) - o1(X2)|  old outputs' move per unit of movement on task 2's own
           inputs: a method that merely learns task 2 more slowly keeps seq_lora's leak (about 1: both
           tasks' outputs move alike), so only selective protection lowers it;
  forgot = the share of task 1's answer-loss gain (base -> after task 1) lost again while learning task 2.
A method must also still learn task 2 (its answer loss falls, its outputs on X2 move), so that learning
nothing cannot pass.

Settings: the helpers' tiny problem (8 examples per task, batch 4, lr 1e-2) with train.epochs=5 (10 steps
per task), enough for seq_lora to lose ~45% of what task 1 taught it; every method at its DEFAULT options.
Measured with these settings (seq_lora: drift 0.88, leak 1.03, forgot 0.44, task-2 loss fell 0.162 nats):
  inflora   drift 0.086, leak 0.34, forgot -0.005, task-2 loss fell 0.052  -> protects
  gainlora  drift 0.035, leak 0.25, forgot -0.005, task-2 loss fell 0.031  -> protects
  gpm       drift 0.84,  leak 1.03, forgot 0.45,   task-2 loss fell 0.139  -> does not (xfail, see GPM_XFAIL)
  olora     drift 0.28,  leak 0.94, forgot 0.04,   task-2 loss fell 0.057  -> learns less, not selectively
The orders hold over other seeds of the helpers' draw (seeds 0-2; LoRA inits and gates; InfLoRA draws
nothing): seq_lora drift 0.81-0.88, leak 1.03-1.04; gainlora drift 0.029-0.035, leak 0.23-0.25; gpm leak 1.03;
olora drift 0.21-0.39, leak 0.94-1.00; and over 3 to 10 epochs (seq_lora leak 0.98-1.04, inflora 0.31-0.36,
gainlora 0.22-0.31).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from method_helpers import learn, setup

from loracl.engine.training import IGNORE, train_task
from loracl.methods.gainlora import GateBank

EPOCHS = ("train.epochs=5",)

# Margins. drift: old outputs move under a quarter as far as under seq_lora (inflora 0.10, gainlora 0.04 of
# seq_lora's drift: >= 2.5x margin); leak: at least twice as selective as seq_lora (inflora 0.33, gainlora
# 0.24 of seq_lora's leak; over 3-10 epochs at most 0.37: >= 1.35x margin); forgot: under a quarter of the
# task-1 gain seq_lora gives back (both protecting methods give back none).
DRIFT_MARGIN, LEAK_MARGIN, FORGOT_MARGIN = 0.25, 0.5, 0.25
# O-LoRA promises less interference, not isolation: its old outputs move 0.21-0.39 against seq_lora's
# 0.81-0.88 over seeds (at most 0.48 of seq_lora's), so it is held to "clearly less", 0.6.
DRIFT_MARGINS = {"olora": 0.6}
# Still learning: task-2 loss fall and output movement on X2 at least a tenth of seq_lora's (the slowest,
# gainlora, whose new gate opens gradually from ~0.04 on its own prompts, measures 0.19 and 0.16). Runs are
# deterministic, so a method that learns nothing (fall <= 0) fails by the whole margin.
LEARN_MARGIN = 0.1


@torch.no_grad()
def answer_log_probs(method, model, ctx) -> tuple[torch.Tensor, float]:
    """Teacher-forced log-probabilities at the answer positions of the task's training examples (positions
    x vocabulary, float64), and their mean answer loss."""
    was_training = model.training
    model.eval()
    rows, nll = [], 0.0
    for batch in ctx.batches():
        with method.step_context(model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                :, :-1
            ]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        log_probs = F.log_softmax(logits[mask].double(), dim=-1)
        rows.append(log_probs)
        nll += float(F.nll_loss(log_probs, targets[mask], reduction="sum"))
    model.train(was_training)
    out = torch.cat(rows)
    return out, nll / out.shape[0]


@dataclass
class Run:
    drift: float
    leak: float
    forgot: float
    moved_new: float  # |o2(X2) - o1(X2)|
    fell: float  # task-2 answer loss after task 1 minus after task 2 (nats)
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # GainLoRA only

    def __str__(self) -> str:
        return (
            f"drift {self.drift:.3f}, leak {self.leak:.3f}, forgot {self.forgot:.3f}, "
            f"moved on task 2 {self.moved_new:.3f}, task-2 loss fell {self.fell:.4f}"
        )


def residual(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """|(I - M M^T) y| / |y| per row."""
    M = basis.to(rows.dtype)
    return (rows - rows @ M @ M.T).norm(dim=1) / rows.norm(dim=1)


def gate_record(method, model, ctx1, ctx2, old_output_basis: torch.Tensor) -> dict[str, torch.Tensor]:
    """g_2 on task 1's and task 2's prompts, and the bound 2 |(I - M M^T) y| / |y| on old prompts (y the new
    gate's MLP outputs, M task 1's output basis): the key stays orthogonal to M, so |cos(y, k)| is at most
    that residual, and |2 sigma(4c) - 1| <= 2|c| (the slope of 2 sigma(4c) is at most 2)."""
    bank: GateBank = method.bank(model)
    p_old, p_new = method.gate_inputs(model, ctx1), method.gate_inputs(model, ctx2)
    with torch.no_grad():
        y_old = bank.mlps[1](p_old)
        return {
            "old": bank(p_old)[:, 1].clone(),
            "own": bank(p_new)[:, 1].clone(),
            "bound": 2 * residual(y_old, old_output_basis),
        }


def two_tasks(name: str, options: dict, tmp_path) -> Run:
    config, method, model, (ctx1, ctx2) = setup(name, options, tmp_path, EPOCHS)
    o0 = [answer_log_probs(method, model, c) for c in (ctx1, ctx2)]
    learn(config, method, model, ctx1)
    o1 = [answer_log_probs(method, model, c) for c in (ctx1, ctx2)]
    gates = {}
    method.before_task(model, ctx2)
    if name == "gainlora":
        old_basis = method.gate_bases["output"].clone()
        gates["start"] = gate_record(method, model, ctx1, ctx2, old_basis)
    train_task(model, method, ctx2.encoded, config.train, ctx2.pad_id, seed=ctx2.index)
    method.after_task(model, ctx2)
    if name == "gainlora":
        gates["end"] = gate_record(method, model, ctx1, ctx2, old_basis)
    o2 = [answer_log_probs(method, model, c) for c in (ctx1, ctx2)]
    (a0, l0), (a1, l1), (a2, l2) = o0[0], o1[0], o2[0]
    (b1, m1), (b2, m2) = o1[1], o2[1]
    moved_old = float((a2 - a1).norm())
    return Run(
        drift=moved_old / float((a1 - a0).norm()),
        leak=moved_old / float((b2 - b1).norm()),
        forgot=(l2 - l1) / (l0 - l1),
        moved_new=float((b2 - b1).norm()),
        fell=m1 - m2,
        gates=gates,
    )


@pytest.fixture(scope="module")
def measure(tmp_path_factory):
    """Runs cached per (method, options) for the module: each pair is trained once."""
    cache: dict[tuple, Run] = {}

    def get(name: str, options: dict | None = None) -> Run:
        options = options or {}
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = two_tasks(name, options, tmp_path_factory.mktemp(name))
        return cache[key]

    return get


def test_seq_lora_forgets_so_the_comparison_means_something(measure):
    seq = measure("seq_lora")
    assert seq.drift > 0.5 and seq.leak > 0.8 and seq.forgot > 0.2, seq  # measured 0.88, 1.03, 0.44
    assert seq.fell > 0.05, seq  # and it learns task 2 (0.162 nats)


GPM_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="GPM on one LoRA projects only A's updates (A x fixed for old x, tests/test_baselines.py); B "
    "trains freely (METHODS.md), and old outputs move through (B' - B) A x: drift 0.84 vs seq_lora "
    "0.88, leak 1.03 vs 1.03, forgot 0.45 vs 0.44, at the defaults and with a full basis (threshold 1:"
    " drift 0.80 vs 0.90)",
)
OLORA_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="O-LoRA's penalty keeps A_2 off A_1's rows, but here both tasks' inputs share those directions: "
    "task 2 is learnt 3x less (loss fell 0.057 vs 0.162) and old outputs move less by as much (drift "
    "0.28 vs 0.88), yet per unit learnt as much as seq_lora (leak 0.94 vs 1.03; 0.91 with lambda1 5 or"
    " 50)",
)


@pytest.mark.parametrize("name", ["inflora", "gainlora", "olora", pytest.param("gpm", marks=GPM_XFAIL)])
def test_old_outputs_move_clearly_less_than_under_seq_lora(measure, name):
    """What each method promises against seq_lora: old outputs move less and less of task 1 is given back
    (O-LoRA passes this by learning task 2 less, see the selectivity test below)."""
    seq, run = measure("seq_lora"), measure(name)
    where = f"{name}: {run}; seq_lora: {seq}"
    assert run.drift < DRIFT_MARGINS.get(name, DRIFT_MARGIN) * seq.drift, where
    assert run.forgot < FORGOT_MARGIN * seq.forgot, where


@pytest.mark.parametrize(
    "name",
    ["inflora", "gainlora", pytest.param("olora", marks=OLORA_XFAIL), pytest.param("gpm", marks=GPM_XFAIL)],
)
def test_old_outputs_move_less_per_unit_learnt_than_under_seq_lora(measure, name):
    """Selectivity: old outputs move less than new ones, where seq_lora moves both alike (leak ~1)."""
    seq, run = measure("seq_lora"), measure(name)
    assert run.leak < LEAK_MARGIN * seq.leak, f"{name}: {run}; seq_lora: {seq}"


@pytest.mark.parametrize("name", ["inflora", "gainlora", "gpm", "olora"])
def test_protecting_method_still_learns_task_2(measure, name):
    seq, run = measure("seq_lora"), measure(name)
    where = f"{name}: {run}; seq_lora: {seq}"
    assert run.fell > LEARN_MARGIN * seq.fell, where
    assert run.moved_new > LEARN_MARGIN * seq.moved_new, where


# -- GainLoRA's new gate on old prompts (DEFAULT options unless stated) --------------------------------------
# Promise: g_2(x) ~ 0 on old inputs. Gate 2 starts as a copy of gate 1 with its key the top direction of its
# outputs on task 2 off task 1's output basis M, and its updates are projected off the old values' bases. So
# g_2(x_old) <= 2 |(I - M M^T) y| / |y| (see gate_record) at any time: the gate is shut exactly as far as the
# MLP's outputs on old prompts stay in M's span. At the defaults the DualGPM rule (0.995) keeps one direction
# per gate basis after task 1, which leaves up to 1.8% of those outputs outside M: bound <= 0.037.
# Bounds asserted: mean g_2 on old prompts below a quarter of its mean on its own prompts, max below 0.05 at
# the start (measured 0.0054 vs 0.042, max 0.018; over seeds of the gate's draw 0.0018-0.0065 vs 0.037-0.049,
# max 0.005-0.018).


def test_gainlora_new_gate_starts_shut_on_old_prompts(measure):
    gates = measure("gainlora").gates["start"]
    old, own, bound = gates["old"], gates["own"], gates["bound"]
    where = f"g_2 old mean {old.mean():.4f} max {old.max():.4f}, own mean {own.mean():.4f}"
    assert bool((old <= bound + 1e-9).all()), f"{where}; bound {bound.tolist()}"  # key orthogonal to M
    assert float(old.mean()) < 0.25 * float(own.mean()), where
    assert float(old.max()) < 0.05, where


GATE_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="at the defaults the authors' row-norm rescaling (keep_row_norms) after each projected step "
    "rescales W1's and W2's rows inside the old values' span too, so the MLP's outputs on old prompts "
    "leave M's span and the gate opens there: after task 2 g_2 mean 0.66 (max 0.70) on task 1's "
    "prompts vs 0.75 on its own (0.45-0.66 vs 0.53-0.75 over seeds; 0.39 vs 0.57 at 3 epochs, 0.89 vs "
    "0.92 at 10)",
)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, marks=GATE_XFAIL, id="defaults"),
        pytest.param({"keep_row_norms": False}, id="no-rescaling"),
    ],
)
def test_gainlora_new_gate_stays_shut_on_old_prompts_after_learning(measure, options):
    # Looser than at the start (mean below a third of its own, max 0.15): without the rescaling the projection
    # keeps W1 p and W2 h for p, h in the (one-direction) old bases, but the rest of the old prompts moves
    # (19% of p lies off its basis at the default 0.995). Measured mean 0.043 (max 0.107) vs own 0.258 (ratio
    # 0.17); over seeds of the gate's draw ratio 0.17-0.23, max 0.06-0.11. At gate_threshold 1 the leak falls
    # to ~1e-3 (test_baselines).
    gates = measure("gainlora", options).gates["end"]
    old, own, bound = gates["old"], gates["own"], gates["bound"]
    where = f"g_2 old mean {old.mean():.4f} max {old.max():.4f}, own mean {own.mean():.4f}"
    assert bool((old <= bound + 1e-9).all()), f"{where}; bound {bound.tolist()}"
    assert float(old.mean()) < float(own.mean()) / 3, where
    assert float(old.max()) < 0.15, where
