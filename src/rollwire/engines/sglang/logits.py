"""rollwire's custom logit processor for SGLang: token masks, and min_p where SGLang cannot do it.

It runs in SGLang's scheduler process on the logits of the rows that carry rollwire parameters,
before SGLang divides by the temperature. The class travels by reference (dill), so the
scheduler imports this module; it must stay importable with nothing but SGLang and torch.

``custom_params`` of a row:

* ``rw_allowed`` / ``rw_disallowed``: token ids kept / removed (logits -> -inf). The per-row
  mask is built once and cached in that row's params dict (SGLang keeps the dict of a request
  for its whole life).
* ``rw_min_p`` with ``rw_temperature``: keep tokens whose probability at that temperature is at
  least ``min_p`` times the top token's, i.e. ``logit >= max_logit + T * ln(min_p)``. Used only
  with ``enable_deterministic_inference``, where SGLang's pytorch sampler asserts that min_p and
  a sampling seed are not used together (sampler.py, ``top_k_top_p_min_p_sampling_from_probs_torch``).
  The kept set is the same as SGLang's min_p would keep; SGLang's reported logprob is then
  normalised over the kept tokens, which is why the adapter refuses min_p with logprobs there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class TokenMask(CustomLogitProcessor):
    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        for i, p in enumerate(custom_param_list or ()):
            if not p:
                continue
            if p.get("rw_allowed") is not None or p.get("rw_disallowed"):
                keep = p.get("_rw_keep")
                if keep is None or keep.device != logits.device or keep.shape[0] != logits.shape[-1]:
                    keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    if p.get("rw_allowed") is not None:
                        keep[:] = False
                        keep[torch.tensor(p["rw_allowed"], dtype=torch.long, device=logits.device)] = True
                    if p.get("rw_disallowed"):
                        keep[torch.tensor(p["rw_disallowed"], dtype=torch.long, device=logits.device)] = False
                    p["_rw_keep"] = keep
                logits[i].masked_fill_(~keep, float("-inf"))
            min_p = p.get("rw_min_p")
            if min_p:
                row = logits[i]
                floor = row.max() + float(p.get("rw_temperature") or 1.0) * math.log(min_p)
                row.masked_fill_(row < floor, float("-inf"))
        return logits
