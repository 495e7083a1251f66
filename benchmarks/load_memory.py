"""Host memory of loading a base model: loracl's loader vs the float32-then-cast path it replaced.

A randomly initialised Llama of about 1B parameters (hidden 2048, 16 layers, intermediate 5632, vocabulary
32000, untied embeddings: 0.95B) is saved once, in bfloat16 safetensors, to a temporary folder. Then, each
in a fresh subprocess (so that one load's peak does not hide the next), it is loaded on the CPU in the
target dtype (bfloat16 by default):
  - old: `AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)` then `.to(dtype)`, the way
    `loracl.models.base_model.load_model` loaded every pretrained model before it loaded in the target dtype;
  - new: `loracl.models.base_model.load_model(path, dtype=..., device="cpu")` as a run calls it.
Peak host memory is the child's peak resident set (`ru_maxrss`), which includes Python, torch and
transformers (`import_rss_gb`, measured in the child before loading) and any pages of the safetensors file
mapped while reading it; after loading, every weight is read once, so that weights left backed by the
mapped file count as they will in training. `new_ratio_to_checkpoint` = new peak / checkpoint bytes
(target <= 1.3).
A few minutes on 2 CPU cores (most of it writing the 1.9 GB checkpoint); `--quick`: a small model, seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cost_common import print_figures, ratio, run_main

GB = 1e9
SIZES = {  # hidden, layers, intermediate, vocabulary
    "quick": (256, 2, 688, 32000),
    "full": (2048, 16, 5632, 32000),
}


def current_rss_bytes() -> int:
    """The resident set of this process now (Linux /proc; 0 where it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_checkpoint(folder: str, hidden: int, layers: int, intermediate: int, vocab: int) -> dict:
    """A random Llama of the given shape saved in bfloat16 safetensors, with loracl's byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loracl.models.base_model import byte_tokenizer

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # drawn in bf16: never a float32 copy of 1B weights
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    files = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return {"params": params, "checkpoint_bytes": files}


def load_in_child(mode: str, folder: str, dtype: str) -> dict:
    """Load the checkpoint the `mode` way; the figures of this process (run as a fresh child)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loracl.models.base_model import load_model

    imported = current_rss_bytes()
    start = time.perf_counter()
    if mode == "old":  # what load_model did before: float32 from disk, then cast
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.to(device="cpu", dtype=getattr(torch, dtype))
    else:
        model = load_model(folder, dtype=dtype, device="cpu").model
    with torch.no_grad():  # read every weight once: weights still backed by the mapped file become resident
        for p in model.parameters():
            p.sum()
    seconds = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {"import_rss": imported, "peak_rss": peak_rss_bytes(), "seconds": seconds, "dtypes": dtypes}


def child(argv: list[str], script: str = __file__) -> dict:
    """Run a script's (default: this one's) `--child` part in a fresh interpreter; its JSON answer."""
    done = subprocess.run(
        [sys.executable, script, "--child", *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {argv[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model: seconds")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            answer = build_checkpoint(rest[0], *map(int, rest[1:]))
        else:
            answer = load_in_child(kind, rest[0], rest[1])
        print(json.dumps(answer))
        return answer
    defaults = SIZES["quick" if args.quick else "full"]
    given = (args.hidden, args.layers, args.intermediate, args.vocab)
    shape = [d if v is None else v for v, d in zip(given, defaults, strict=True)]
    with tempfile.TemporaryDirectory(prefix="loracl-load-memory-") as folder:
        start = time.perf_counter()
        built = child(["build", folder, *map(str, shape)])
        print(f"built {built['params'] / 1e9:.3f}B parameters in {time.perf_counter() - start:.0f} s")
        old = child(["old", folder, args.dtype])
        new = child(["new", folder, args.dtype])
    checkpoint = built["checkpoint_bytes"]
    for name, got in (("old", old), ("new", new)):
        print(f"{name}: parameters in {', '.join(got['dtypes'])}, loaded in {got['seconds']:.1f} s")
    figures = {
        "params_billions": built["params"] / 1e9,
        "checkpoint_gb": checkpoint / GB,
        "import_rss_gb": new["import_rss"] / GB,
        "old_peak_rss_gb": old["peak_rss"] / GB,
        "new_peak_rss_gb": new["peak_rss"] / GB,
        "old_ratio_to_checkpoint": ratio(old["peak_rss"], checkpoint),
        "new_ratio_to_checkpoint": ratio(new["peak_rss"], checkpoint),
        "new_load_increment_ratio_to_checkpoint": ratio(new["peak_rss"] - new["import_rss"], checkpoint),
        "new_vs_old_peak_rss_ratio": ratio(new["peak_rss"], old["peak_rss"]),
        "old_load_seconds": old["seconds"],
        "new_load_seconds": new["seconds"],
    }
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
