"""Per-request sampling for the hf engine, over one step's logits of a whole batch.

Logprob definition (what every hf delta reports): for a row with temperature ``T`` (``T = 1``
when greedy) and token mask ``M`` (allowed / disallowed ids; excluded logits are -inf),

    logprob = log_softmax(masked_logits / T)[sampled token]

computed *before* top-k / top-p / min-p truncation. That is what a trainer's forward pass with
the same temperature and the same mask gives, so it can be compared (importance ratios) without
knowing the truncation. The token itself is drawn from the truncated distribution.

Sampled rows draw one uniform number per step from their own CPU ``torch.Generator`` and pick
the token by inverse CDF, so the same seed and the same weights give the same tokens whatever
the batch mates are (and on any device). Greedy rows take the argmax of the masked logits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rollwire.engines.validation import GREEDY_BELOW
from rollwire.messages.generate import SamplingParams


@dataclass
class RowSampler:
    """Sampling state of one request: its parameters, mask and RNG."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    generator: torch.Generator | None  # None for greedy rows
    mask: torch.Tensor | None  # [V] additive mask (0 or -inf) on the model's device, or None
    want_logprob: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def make_row_sampler(params: SamplingParams, vocab_size: int, device: torch.device,
                     want_logprob: bool) -> RowSampler:
    mask = None
    if params.allowed_token_ids is not None or params.disallowed_token_ids:
        keep = torch.zeros(vocab_size, dtype=torch.bool)
        if params.allowed_token_ids is not None:
            keep[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = True
        else:
            keep[:] = True
        if params.disallowed_token_ids:
            keep[torch.tensor(params.disallowed_token_ids, dtype=torch.long)] = False
        mask = torch.zeros(vocab_size, dtype=torch.float32).masked_fill_(~keep, float("-inf")).to(device)
    generator = None
    temperature = float(params.temperature) if params.temperature >= GREEDY_BELOW else 0.0
    if temperature > 0.0:
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device="cpu").manual_seed(seed)
    return RowSampler(
        temperature=temperature, top_k=int(params.top_k), top_p=float(params.top_p),
        min_p=float(params.min_p), generator=generator, mask=mask, want_logprob=want_logprob,
    )


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[list[int], list[float | None]]:
    """Pick one token per row of ``logits`` [B, V]; returns tokens and logprobs (None where a row
    did not ask for them)."""
    logits = logits.float()
    n = len(rows)
    masks = [r.mask for r in rows]
    if any(m is not None for m in masks):
        zero = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        logits = logits + torch.stack([m if m is not None else zero for m in masks])
    greedy_idx = [i for i, r in enumerate(rows) if r.greedy]
    sampled_idx = [i for i, r in enumerate(rows) if not r.greedy]
    want_lp = any(r.want_logprob for r in rows)

    if not sampled_idx:  # fast path: the whole batch is greedy
        tok = logits.argmax(dim=-1)
        lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0] if want_lp else None
        return _to_lists(tok, lp, rows)

    temps = torch.tensor([r.temperature if not r.greedy else 1.0 for r in rows],
                         dtype=logits.dtype, device=logits.device)
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tok = logits.argmax(dim=-1) if greedy_idx else torch.empty(n, dtype=torch.long, device=logits.device)
    s_rows = [rows[i] for i in sampled_idx]
    s_index = torch.tensor(sampled_idx, dtype=torch.long, device=logits.device)
    probs = logp.index_select(0, s_index).exp()
    u = torch.tensor([torch.rand((), generator=r.generator).item() for r in s_rows],
                     dtype=probs.dtype).to(probs.device)
    truncates = any(r.truncates for r in s_rows)
    chosen = _sample_truncated(probs, s_rows, u) if truncates else _inverse_cdf(probs, u)
    tok = tok.index_copy(0, s_index, chosen)
    lp = logp.gather(1, tok[:, None])[:, 0] if want_lp else None
    return _to_lists(tok, lp, rows)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token index per row whose CDF interval holds ``u * total`` (never a zero-probability id)."""
    cdf = probs.cumsum(dim=-1)
    x = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).clamp_(max=probs.shape[-1] - 1)
    bad = probs.gather(1, idx) <= 0  # rounding at the top end: fall back to the most likely id
    idx = torch.where(bad, probs.argmax(dim=-1, keepdim=True), idx)
    return idx[:, 0]


def _sample_truncated(probs: torch.Tensor, rows: list[RowSampler], u: torch.Tensor) -> torch.Tensor:
    """top-k, then top-p (on the untruncated mass, as SGLang), then min-p; then inverse CDF in
    vocabulary order, as the untruncated path does."""
    vocab = probs.shape[-1]
    dev = probs.device
    top_k = torch.tensor([r.top_k if r.top_k > 0 else vocab for r in rows], device=dev)
    top_p = torch.tensor([r.top_p for r in rows], dtype=probs.dtype, device=dev)
    min_p = torch.tensor([r.min_p for r in rows], dtype=probs.dtype, device=dev)
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=dev)
    keep = rank[None, :] < top_k[:, None]
    keep &= ((sorted_p.cumsum(dim=-1) - sorted_p) < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep &= sorted_p >= min_p[:, None] * sorted_p[:, :1]
    keep[:, 0] = True
    # back to vocabulary order, so a row draws the same token whichever path its batch mates take
    keep = torch.zeros_like(keep).scatter_(1, sorted_idx, keep)
    return _inverse_cdf(probs * keep, u)


def _to_lists(tok: torch.Tensor, lp: torch.Tensor | None,
              rows: list[RowSampler]) -> tuple[list[int], list[float | None]]:
    tokens: list[int] = tok.tolist()
    if lp is None:
        return tokens, [None] * len(rows)
    values: list[float] = lp.tolist()
    return tokens, [v if r.want_logprob else None for v, r in zip(values, rows, strict=True)]
