"""Host memory and time of one training step with and without `train.gradient_checkpointing`, on the CPU.

The ~1B random Llama of load_memory.py (hidden 2048, 16 layers, intermediate 5632, vocabulary 32000) is saved
once in bfloat16 safetensors; then, each in a fresh subprocess, loracl loads it (`load_model`, float32 on
the CPU by default, as `dtype: auto` does there), wraps it in the `seq_lora` method's LoRA (r 8 on q_proj and
v_proj) and runs one step of `loracl.engine.training.train_task` on one example of 512 tokens (256 prompt,
256 answer tokens carrying the loss; batch 1) with the flag off, then on.
Memory: the child's resident set after loading (`model_rss_gb`) and its peak during the step alone (VmHWM,
reset through /proc/self/clear_refs just before the step; Linux), so `*_step_extra_gb` is what the step
adds: activations kept for the backward pass, gradients, optimizer state, allocator caches.
A few minutes on 2 CPU cores; `--quick`: a small model and 64 tokens, seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cost_common import print_figures, ratio, run_main
from load_memory import GB, SIZES, build_checkpoint, child, peak_rss_bytes

QUICK_TOKENS = 64


def vm_kilobytes(field: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def step_in_child(folder: str, checkpointing: bool, tokens: int, dtype: str, threads: int | None) -> dict:
    """Load, wrap in seq_lora's LoRA, and time one train_task step; the figures of this process."""
    import random

    import torch

    from loracl.config import LoraSection, TrainSection
    from loracl.data.text import Encoded
    from loracl.engine.training import train_task
    from loracl.methods import create_method
    from loracl.models.base_model import load_model

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(folder, dtype=dtype, device="cpu")
    method = create_method("seq_lora", {}, LoraSection(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    model = method.prepare_model(loaded.model)
    rng = random.Random(0)
    vocab = loaded.model.config.vocab_size
    example = Encoded(input_ids=[rng.randrange(3, vocab) for _ in range(tokens)], prompt_len=tokens // 2,
                      truncated=False)  # fmt: skip
    cfg = TrainSection(batch_size=1, max_length=tokens, lr=1e-4, gradient_checkpointing=checkpointing)
    model_rss = vm_kilobytes("VmRSS") or 0
    exact = reset_peak()
    start = time.perf_counter()
    pad_id = loaded.tokenizer.pad_token_id
    stats = train_task(model, method, [example], cfg, pad_id, seed=0, description="step")
    seconds = time.perf_counter() - start
    peak = (vm_kilobytes("VmHWM") if exact else None) or peak_rss_bytes()
    return {"model_rss": model_rss, "peak_rss": peak, "seconds": seconds, "loss": stats.final_loss,
            "peak_is_step_only": exact}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and 64 tokens: seconds")
    parser.add_argument("--tokens", type=int, help="tokens of the example (default 512)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads in the children")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            answer = build_checkpoint(rest[0], *map(int, rest[1:]))
        else:
            threads = int(rest[3]) if rest[3] != "0" else None
            answer = step_in_child(rest[0], rest[1] == "on", int(rest[2]), args.dtype, threads)
        print(json.dumps(answer))
        return answer
    shape = SIZES["quick" if args.quick else "full"]
    tokens = args.tokens or (QUICK_TOKENS if args.quick else 512)
    options = ["--dtype", args.dtype]
    with tempfile.TemporaryDirectory(prefix="loracl-checkpointing-memory-") as folder:
        built = child(["build", folder, *map(str, shape)], __file__)
        print(f"built {built['params'] / 1e9:.3f}B parameters; one step of {tokens} tokens each way")
        threads = str(args.threads or 0)
        plain, ckpt = (
            child(["step", folder, flag, str(tokens), threads, *options], __file__) for flag in ("off", "on")
        )
    if not (plain["peak_is_step_only"] and ckpt["peak_is_step_only"]):
        print("note: VmHWM could not be reset: the peaks include loading")
    plain_extra = plain["peak_rss"] - plain["model_rss"]
    ckpt_extra = ckpt["peak_rss"] - ckpt["model_rss"]
    figures = {
        "params_billions": built["params"] / 1e9,
        "tokens": tokens,
        "model_rss_gb": plain["model_rss"] / GB,
        "plain_step_peak_rss_gb": plain["peak_rss"] / GB,
        "checkpointed_step_peak_rss_gb": ckpt["peak_rss"] / GB,
        "plain_step_extra_gb": plain_extra / GB,
        "checkpointed_step_extra_gb": ckpt_extra / GB,
        "step_extra_ratio": ratio(ckpt_extra, plain_extra),
        "step_peak_ratio": ratio(ckpt["peak_rss"], plain["peak_rss"]),
        "plain_step_seconds": plain["seconds"],
        "checkpointed_step_seconds": ckpt["seconds"],
        "step_time_ratio": ratio(ckpt["seconds"], plain["seconds"]),
        "loss_abs_difference": abs(ckpt["loss"] - plain["loss"]),
    }
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
