"""A CPU stand-in for the parts of sglang 0.5.15 that rollwire's SGLangEngine touches.

Only for testing the adapter's own logic (pauses, versions, eviction, aborts) where no GPU is
present. It imitates SGLang's *interfaces and documented behaviour* as read from its source
(stream outputs read through ReqState, prefix-matching aborts, pause modes, flush and release
asserting an idle scheduler, abort_all_requests, weight_version); it is not SGLang. The real thing
is checked by tests/gpu/run_gpu.sh on a GPU.
"""

__version__ = "0.5.15"  # the release it imitates (the adapter checks the range at start)

from sglang.srt.entrypoints_engine import Engine  # noqa: F401
