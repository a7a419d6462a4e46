"""The hf engine's per-session prefix cache: the KV of a session's last turn, kept for the next.

When a request with a ``session_id`` finishes (stop or length), the KV of every token it fed to
the model (prompt + output but the last token) is cloned out of the running batch into an
``Entry``. The session's next request, whose input_ids extend that history, is prefilled from
the entry: only the tokens after the longest common prefix run through the model. KV at a
position depends only on the tokens up to it, so any common prefix is exact.

An entry remembers the weight version that computed it (-1 when a weight load happened while
the request ran with its KV kept, i.e. an in_place pause): after a weight update the prefix is
recomputed unless the request says ``keep_stale_prefix``. Entries are bounded by bytes and
evicted least recently used; ``drop`` frees one at once (session closed or expired). An entry
counts what it costs the process, not only its KV (``entry_bytes``): any client may name a
session on a plain request, and many one-token entries hold ~2-4 KB each in tensor and list
objects against 512 B of KV (tiny model), so counting KV alone let 7x the budget in.

Threading: entries are created and looked up on the event loop; their ``kv`` is filled on the
engine's single worker thread, by a job queued before any later step, so a step that uses an
entry always finds it filled.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from rollwire.engines.hf import batch as hf_batch

STALE = -1  # version of KV computed partly under an older version
# what an entry holds beside its KV bytes (measured here, tiny model: ~2.2-2.7 KB for 2 layers):
# the Entry, two tensors and their storages per layer, and the token list (a pointer and, above
# 256, an int object per token)
ENTRY_BYTES = 512
LAYER_BYTES = 1024
TOKEN_BYTES = 40


@dataclass(eq=False)
class Entry:
    tokens: list[int]  # the token ids whose KV is kept, in order
    version: int
    nbytes: int  # of the kv, known before the worker fills it
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, kv_heads, len, head_dim]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case (b extends a), compared in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._nbytes = 0  # of the entries held (kept as they come and go: read on every status)
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def lookup(self, session_id: str, input_ids: list[int], version: int, keep_stale: bool) -> tuple[Entry, int] | None:
        """The entry and how many of ``input_ids``' leading tokens it covers (at least one token
        is always left to prefill: the step needs logits), or None."""
        entry = self._entries.get(session_id)
        if entry is None or (entry.version != version and not keep_stale):
            return None
        n = min(common_prefix(entry.tokens, input_ids), len(input_ids) - 1)
        if n <= 0:
            return None
        self._entries.move_to_end(session_id)
        self.hits += 1
        self.reused_tokens += n
        return entry, n

    def put(self, session_id: str, entry: Entry) -> None:
        self.drop(session_id)
        self._entries[session_id] = entry
        self._nbytes += entry.nbytes

    def drop(self, session_id: str) -> None:
        old = self._entries.pop(session_id, None)
        if old is not None:
            self._nbytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0

    def evict_to_budget(self) -> None:
        """Drop least recently used entries until the rest fit in ``max_bytes`` (the newest stays)."""
        while len(self._entries) > 1 and self._nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._nbytes -= old.nbytes


def fill(entry: Entry, batch: hf_batch.Batch, row: int) -> None:
    """Worker thread: clone row ``row``'s real KV (the right end of the time axis) into ``entry``."""
    n = len(entry.tokens)
    if int(batch.mask[row].sum()) != n:  # not the KV we think it is: keep nothing (full prefill next time)
        return
    entry.kv = [(k[row:row + 1, :, -n:].clone(), v[row:row + 1, :, -n:].clone()) for k, v in batch.kv]


def bytes_per_token(batch: hf_batch.Batch) -> int:
    """KV bytes one token takes (all layers, keys and values)."""
    return sum(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
               for k, v in batch.kv)


def entry_bytes(batch: hf_batch.Batch, tokens: int) -> int:
    """What an entry of ``tokens`` tokens costs, known before its KV is filled: the KV and the
    objects that hold it."""
    return tokens * (bytes_per_token(batch) + TOKEN_BYTES) + ENTRY_BYTES + LAYER_BYTES * len(batch.kv)


def prefill_from(model: torch.nn.Module, entry: Entry, reused: int, ids: list[int],
                 device: torch.device) -> tuple[hf_batch.Batch, torch.Tensor]:
    """Worker thread: prefill ``ids[reused:]`` on top of the entry's first ``reused`` tokens of
    KV; returns a one-row batch and its last-position logits [1, V]."""
    assert entry.kv is not None
    past = hf_batch.cache_of([(k[:, :, :reused], v[:, :, :reused]) for k, v in entry.kv])  # views: never written
    suffix = torch.tensor([ids[reused:]], dtype=torch.long, device=device)
    mask = torch.ones((1, len(ids)), dtype=torch.long, device=device)
    positions = torch.arange(reused, len(ids), dtype=torch.long, device=device)[None, :]
    out = model(input_ids=suffix, attention_mask=mask, position_ids=positions, **hf_batch.cache_kwarg(model, past),
                use_cache=True, logits_to_keep=1)
    return hf_batch.Batch(cache=past, mask=mask), out.logits[:, -1, :]
