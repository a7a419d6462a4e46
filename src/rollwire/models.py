"""Models the engines load: a tiny Qwen2-shaped model built locally, or a local HF checkpoint.

``tiny(seed)`` needs no hub and no files: the weights come from a seeded ``torch.Generator``
(same seed -> bit-identical weights in every call and every process) and the tokenizer is a
character-level ``tokenizers`` model over printable ASCII. Tests, the demo and the CPU benchmarks
use it; real deployments pass a checkpoint directory to ``load_model``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_VOCAB = 512
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2; then one id per printable ASCII character
# chat markers, added after the characters (ids 103-106): one token each, never split by the pre-tokenizer
IM_START, IM_END, TOOL_CALL, TOOL_CALL_END = "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"
CHAT_TOKENS = (IM_START, IM_END, TOOL_CALL, TOOL_CALL_END)
# The tiny model's chat template: Qwen's shape (ChatML turns, tools listed in the system turn, Hermes
# tool calls ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), kept short for CPU tests.
TINY_CHAT_TEMPLATE = (
    "{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none %}"
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{% if sys %}{{- sys + '\\n' }}{% endif %}{{- 'Tools:' }}"
    "{%- for t in tools %}{{- '\\n' }}{{- t | tojson }}{% endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif sys is not none %}{{- '<|im_start|>system\\n' + sys + '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + (m.content or '') }}"
    "{%- for c in m.tool_calls or [] %}{{- '<tool_call>{\"name\": \"' + c.function.name + '\", \"arguments\": ' }}"
    "{%- if c.function.arguments is string %}{{- c.function.arguments }}{% else %}{{- c.function.arguments | tojson }}"
    "{%- endif %}{{- '}</tool_call>' }}{% endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_INIT_STD = 0.15  # wider than the usual 0.02: activations that carry the prompt through
TINY_HEAD_STD = 0.5  # lm_head: logits of std ~4, so greedy picks have clear margins over float noise


def tiny_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, then printable ASCII, then
    the chat markers (``CHAT_TOKENS``); ``chat_template`` is ``TINY_CHAT_TEMPLATE``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *chars))}
    assert len(vocab) <= TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # the turn markers are special (skipped when decoding); tool-call markers are text, as in Qwen's tokenizer
    tok.add_tokens([AddedToken(t, special=t in (IM_START, IM_END), normalized=False) for t in CHAT_TOKENS])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


def tiny(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A 2-layer Qwen2ForCausalLM (vocab 512, hidden 64) with seeded weights, and its tokenizer.

    Every parameter is drawn from one ``torch.Generator(seed)`` in ``named_parameters`` order
    (norm weights are ones, biases zeros), so the result does not depend on the global RNG, on
    transformers' own init code or on the process.
    """
    config = tiny_config()
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = TINY_HEAD_STD if name.startswith("lm_head.") else TINY_INIT_STD
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
    )
    return _frozen(model), tiny_tokenizer()


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def _dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None
    t = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(t, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return t


def load_model(spec: str, device: str = "cpu", dtype: str | None = None) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)``: ``"tiny"`` / ``"tiny:SEED"`` builds the tiny model; any other
    spec is a local checkpoint directory (no hub access). The tokenizer is None when the
    checkpoint has none. The model is in eval mode with ``requires_grad`` off."""
    torch_dtype = _dtype(dtype)
    if spec == "tiny" or spec.startswith("tiny:"):
        _, _, seed = spec.partition(":")
        tiny_model, tok = tiny(int(seed) if seed else 0)
        moved: Any = tiny_model
        return _frozen(moved.to(device=device, dtype=torch_dtype)), tok
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"model spec {spec!r} is neither 'tiny[:SEED]' nor a local directory")
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch_dtype if torch_dtype is not None else "auto",
    )
    model = model.to(device)
    tokenizer: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return _frozen(model), tokenizer
