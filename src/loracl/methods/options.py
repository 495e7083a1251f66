"""The options of every method (the `method:` section of a config, less `name`): pydantic models only.

They live here, not beside each method's implementation, so that they can be read without importing torch
(`loracl methods NAME` lists them from `loracl.methods.catalog`); each implementation names its class as
`Options`. Every field carries a one-line `description`, shown by `loracl methods NAME`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # for annotations only: loracl.models.subspace imports torch
    from loracl.models.subspace import BasisRule

# The defaults of loracl.models.subspace (GPM_THRESHOLD, GPM_THRESHOLD_STEP, DUAL_GPM_THRESHOLD,
# DUAL_GPM_TASKS), repeated here because that module imports torch; tests/test_cli.py checks they agree.
GPM_THRESHOLD = 0.97
GPM_THRESHOLD_STEP = 0.003
DUAL_GPM_THRESHOLD = 0.995
DUAL_GPM_TASKS = 15


class MethodOptions(BaseModel):
    """Options of a method (the `method:` section of a config, less `name`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a nan option would fail mid-run


class SLAOOptions(MethodOptions):
    # The ablations the paper reports (init, merge, schedule, freeze); the first value is the paper's method.
    init: Literal["last_ft", "last_merge", "random"] = Field(
        "last_ft",
        description="A at the start of task i >= 2: an orthonormal basis of the previous fine-tuned A "
        "(last_ft, the paper's) or merged A (last_merge), with that B; random: PEFT's init",
    )
    merge: Literal["B", "A_and_B", "A", "none"] = Field(
        "B",
        description="the factors merged with weight λ(i) after each task; the others take the fine-tuned "
        "ones (paper: B)",
    )
    schedule: Literal["inv_sqrt", "inv", "constant"] = Field(
        "inv_sqrt", description="merge weight λ(i): 1/sqrt(i) (the paper's), 1/i (a running mean) or constant"
    )
    constant: float = Field(0.5, description="λ(i) when schedule is constant")
    freeze: Literal["none", "A", "B"] = Field(
        "none", description="a factor kept frozen while training tasks i >= 2 (a paper ablation)"
    )
    # Not in the paper (METHODS.md has B_init = B_ft,i-1 as is): B_init = B_ft,i-1 C and, in the merge,
    # B_m,i-1 C, C = A_ft,i-1 A_init^T, so that the orthonormal init changes no layer's B A.
    rebase_b: bool = Field(
        False,
        description="not in the paper: B_init = B_ft C, C = A_ft A_initᵀ, so the init keeps B A (needs init "
        "last_ft/last_merge, merge B/none)",
    )

    @model_validator(mode="after")
    def _rebase_needs_a_basis_of_the_paired_a(self) -> SLAOOptions:
        if self.rebase_b and (self.init == "random" or self.merge not in ("B", "none")):
            raise ValueError(
                "rebase_b needs init last_ft or last_merge and merge B or none (the merged B must be paired "
                "with the A whose basis starts the next task)"
            )
        return self


class OLoRAOptions(MethodOptions):
    lambda1: float = Field(
        0.5, description="weight of the L1 orthogonality penalty Σ|A_j A_iᵀ| (O-LoRA's 0.5)"
    )
    lambda2: float = Field(0.0, description="weight of the squared norm of the new A_i, B_i (O-LoRA's 0)")


class EWCOptions(MethodOptions):
    # λ = 1e4, selected on validation (issue 17): `loracl bench --tune 'train.lr=1e-3,3e-3;method.lam=1,100,
    # 10000' --select-on validation` on order1 of the shared data (SmolLM2-135M, 100 training examples per
    # task, 20 of them held out): validation AP 42.5 at λ 1e4 against 35.0 at λ 1 and 100 (lr 3e-3), BWT 0.0
    # against -8.3 and -11.7. λ = 1 and 100 left EWC indistinguishable from seq_lora (the Fisher of LoRA
    # parameters is small). λ 1e4 was the largest candidate; docs/results.md has the table.
    lam: float = Field(1e4, ge=0, description="penalty strength λ in (λ/2) Σ F (θ − θ*)² (set on validation)")
    fisher_samples: int = Field(200, gt=0, description="examples per finished task used for its Fisher")


class MemoryOptions(MethodOptions):
    # No canonical size for LLM task sequences; a small episodic memory as in ER / A-GEM (Chaudhry et al.).
    memory_size: int = Field(200, gt=0, description="examples kept from all past tasks (reservoir)")
    memory_batch_size: int | None = Field(
        None, gt=0, description="examples drawn from the memory per training step (default: train.batch_size)"
    )


class GPMOptions(MethodOptions):
    threshold: float = Field(GPM_THRESHOLD, gt=0, le=1, description="GPM's epsilon for task 1")
    threshold_step: float = Field(GPM_THRESHOLD_STEP, ge=0, description="its rise per task (capped at 1)")
    max_examples: int = Field(125, gt=0, description="training examples giving the inputs (GPM: 125)")

    def basis_rule(self) -> BasisRule:
        from loracl.models.subspace import BasisRule

        return BasisRule("gpm", self.threshold, step=self.threshold_step)


class DualGPMOptions(MethodOptions):
    """Options of the methods whose input bases follow the DualGPM rule (InfLoRA, GainLoRA)."""

    threshold: float = Field(DUAL_GPM_THRESHOLD, gt=0, le=1, description="epsilon_0 of the DualGPM rule")
    threshold_tasks: int = Field(
        DUAL_GPM_TASKS, gt=0, description="T_s: epsilon rises linearly from epsilon_0 to 1 over T_s tasks"
    )
    max_examples: int | None = Field(
        None,
        gt=0,
        description="training examples whose tokens give the input statistics (default: all, as the "
        "authors' code, which reads up to 1000 batches)",
    )

    def basis_rule(self) -> BasisRule:
        from loracl.models.subspace import BasisRule

        return BasisRule("dual_gpm", self.threshold, tasks=self.threshold_tasks)


class InfLoRAOptions(DualGPMOptions):
    a_scale: float = Field(
        1 / math.sqrt(3), gt=0, description="norm of each row of the designed A (the authors' 1/sqrt(3))"
    )


class GainLoRAOptions(InfLoRAOptions):
    branch: Literal["inflora", "olora"] = Field(
        "inflora", description="each task's LoRA branch: InfLoRA's designed A (authors' default) or O-LoRA"
    )
    gate_hidden: int = Field(100, gt=0, description="hidden width of each gate's MLP (authors' code)")
    gate_threshold: float = Field(
        DUAL_GPM_THRESHOLD, gt=0, le=1, description="epsilon_0 of the gates' bases (authors' transthreshold)"
    )
    keep_row_norms: bool = Field(
        True,
        description="rescale each projected row of W1, W2 and the key to its norm after the step "
        "(authors' code)",
    )
    lambda1: float = Field(0.5, description="branch olora only: O-LoRA's orthogonality weight λ1")
    lambda2: float = Field(0.0, description="branch olora only: O-LoRA's norm weight λ2")

    def gate_rule(self) -> BasisRule:
        from loracl.models.subspace import BasisRule

        return BasisRule("dual_gpm", self.gate_threshold, tasks=self.threshold_tasks)


class MergingOptions(MethodOptions):
    rank: int | None = Field(
        None,
        gt=0,
        description="truncate the merged delta by SVD to one LoRA of this rank (default: full rank, exact)",
    )


class MagMaxOptions(MergingOptions):
    scale: float = Field(0.5, gt=0, description="λ applied to the merged task vector (authors' 0.5)")


class TaskArithmeticOptions(MergingOptions):
    scale: float | None = Field(None, gt=0, description="λ per task vector (default 1/i: their mean)")


class TiesOptions(MergingOptions):
    density: float = Field(0.2, gt=0, le=1, description="fraction of each task vector's entries kept")
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="sign election: by total mass (TIES) or by count"
    )
    scale: float = Field(0.55, gt=0, description="λ applied to the merged delta (MagMax authors' 0.55)")
