"""The catalog entry of `l2_anchor`, which the entry point names. It imports no torch: `loracl methods` lists
the method from it alone, and loracl imports `implementation` only when the method is used."""

from __future__ import annotations

from pydantic import Field

from loracl.methods import MethodOptions, MethodSpec


class L2AnchorOptions(MethodOptions):
    strength: float = Field(
        1.0,
        ge=0,
        description="λ of the penalty (λ/2) Σ (θ − θ*)² pulling the LoRA parameters θ toward their values θ* "
        "at the end of the previous task; 0 is seq_lora",
    )


L2_ANCHOR = MethodSpec(
    name="l2_anchor",
    summary="one LoRA fine-tuned on each task in turn, pulled by (λ/2) Σ (θ − θ*)² toward its value after "
    "the previous task (example plugin)",
    implementation="loracl_example_plugin.method:L2Anchor",
    options=L2AnchorOptions,
    memory_growth="constant (one LoRA + its copy after the previous task)",
)
