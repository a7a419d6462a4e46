"""The SGLang engine (``engine.SGLangEngine``); needs the ``rollwire[sglang]`` extra.

The public names are resolved lazily: importing ``rollwire.engines.sglang.engine`` raises
ImportError without SGLang (the server turns it into an install hint), while modules that need
no SGLang (``payloads``, ``args``) stay importable for CPU tests, and SGLang's scheduler process
imports ``logits`` (the custom logit processor travels by reference) without loading the adapter.

Modules: ``engine`` (the Engine protocol), ``requests`` (segments, outputs, version spans),
``control`` (pause, release, flush), ``weights`` (tensor and NCCL loads), ``payloads``
(bucketing, serialization), ``args`` (engine arguments, checkpoint facts), ``logits`` (the logit
processor), ``compat`` (every read of SGLang's private state, and the version range checked at
start). The other modules call the TokenizerManager's request methods (``generate_request``,
``pause_generation``, ``update_weights_from_tensor``...), the ones SGLang's own HTTP server calls.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollwire.engines.sglang.engine import SGLangEngine, convert_engine_args

__all__ = ["SGLangEngine", "convert_engine_args"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("rollwire.engines.sglang.engine"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
