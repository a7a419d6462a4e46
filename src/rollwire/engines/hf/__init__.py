"""The embedded transformers engine (``engine.HFEngine``), runs anywhere torch does.

Modules: ``engine`` (the Engine protocol), ``scheduler`` (the step loop it owns), ``batch`` (the
shared left-padded KV batch), ``prefix`` (per-session prefix cache), ``requests`` (per-request
state, fair queue, deltas), ``sampling`` (per-row sampling), ``weights`` (in-place loads,
release/restore), ``faults`` (test-only fault injection).
"""

from rollwire.engines.hf.engine import HFEngine

__all__ = ["HFEngine"]
