"""The running batch of the hf engine: one left-padded KV cache shared by all rows (TGI style).

Row ``i`` of the batch is one request. Its KV occupies the right end of the time axis; columns
to its left are padding, marked 0 in ``mask``. Every forward pass gets the 2D mask (so pads get
no attention) and per-row ``position_ids`` (so RoPE sees each row's true positions). Joiners are
prefilled together (left-padded), then concatenated; finished rows are dropped with
``index_select`` and leading columns that are padding in every row are trimmed.

All functions here run on the engine's worker thread under ``torch.inference_mode``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class Batch:
    cache: DynamicCache  # per layer keys/values [B, kv_heads, T, head_dim]; grows by one column a step
    mask: torch.Tensor  # [B, T] long: 1 where the cache holds a real token of the row

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers: list[Any] = list(self.cache.layers)
        return [(layer.keys, layer.values) for layer in layers]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


def cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding ``kv`` without copying it (the constructor would copy)."""
    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in kv])
    layers: list[Any] = list(cache.layers)
    for layer, (k, v) in zip(layers, kv, strict=True):
        layer.keys, layer.values = k, v
    return cache


def prefill(model: torch.nn.Module, prompts: list[list[int]], device: torch.device,
            pad_id: int = 0) -> tuple[Batch, torch.Tensor]:
    """Run the prompts (left-padded together); returns their batch and last-position logits [n, V]."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache),
                use_cache=True, logits_to_keep=1)
    return Batch(cache=cache, mask=mask), out.logits[:, -1, :]


_CACHE_PARAM: dict[type, str] = {}


def cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache argument under the name this transformers release takes: ``cache`` in recent
    5.x (which warns on ``past_key_values``), ``past_key_values`` before."""
    name = _CACHE_PARAM.get(type(model))
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = _CACHE_PARAM[type(model)] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def decode(model: torch.nn.Module, batch: Batch, last_tokens: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """Feed each row its last sampled token [B]; grows ``batch`` in place, returns it and logits [B, V]."""
    positions = batch.mask.sum(dim=-1, keepdim=True)
    mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
    out = model(input_ids=last_tokens[:, None], attention_mask=mask, position_ids=positions,
                **cache_kwarg(model, batch.cache), use_cache=True, logits_to_keep=1)
    batch.mask = mask
    return batch, out.logits[:, -1, :]


def _left_pad(t: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def concat(a: Batch | None, b: Batch) -> Batch:
    """Rows of ``a`` then rows of ``b``, padded on the left to a common length."""
    if a is None or a.size == 0:
        return b
    length = max(a.length, b.length)
    pa, pb = length - a.length, length - b.length
    kv = [
        (torch.cat([_left_pad(ka, pa, 2), _left_pad(kb, pb, 2)]), torch.cat([_left_pad(va, pa, 2),
                                                                            _left_pad(vb, pb, 2)]))
        for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)
    ]
    return Batch(cache=cache_of(kv), mask=torch.cat([_left_pad(a.mask, pa, 1), _left_pad(b.mask, pb, 1)]))


def select(batch: Batch, keep: list[int]) -> Batch | None:
    """Keep rows ``keep`` (in that order) and trim columns that are padding in every kept row."""
    if not keep:
        return None
    if keep == list(range(batch.size)):
        return batch
    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, idx)
    first = int(mask.any(dim=0).long().argmax())  # first column that is real in some row
    mask = mask[:, first:]
    kv = [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:]) for k, v in batch.kv]
    return Batch(cache=cache_of(kv), mask=mask)
