"""One loader for the `adapter/` folder of every method's run.

- A single-adapter folder (SLAO, SeqLoRA, GPM, ...) is a stock PEFT folder: `PeftModel.from_pretrained`.
- A multi-adapter folder (IncLoRA, O-LoRA, InfLoRA, GainLoRA) has a `loracl_adapter.json` manifest (layout in
  `loracl.multi_lora`): every task adapter is loaded by name through stock PEFT, all are made active, and the
  method named in the manifest restores its extra state (e.g. GainLoRA's gates) through its `restore` hook.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

from .multi_lora import activate_all, read_manifest


def load_adapter(path: str | Path, base_model: PreTrainedModel) -> PeftModel:
    """The exported model of a run: `base_model` wrapped with the adapter(s) in `path`, in eval mode."""
    from .methods import method_class  # late import: methods import this package's helpers

    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest is None:
        return PeftModel.from_pretrained(base_model, str(directory)).eval()
    first, *rest = manifest["adapters"]
    model = PeftModel.from_pretrained(base_model, str(directory / first), adapter_name=first)
    for name in rest:
        model.load_adapter(str(directory / name), adapter_name=name)
    activate_all(model, trainable=None)
    method_class(manifest["method"]).restore(model, directory, manifest)
    return model.eval()
