"""Every place the adapter reaches into SGLang below its documented surface, and the versions that
was tested on.

SGLang's ``Engine`` offers no way to read a streamed request's tokens as they land, to pause from
inside its own event loop, or to keep its signal handlers from killing this process, so the
adapter uses TokenizerManager internals: ``rid_to_state`` and the ``ReqState`` it holds
(``output_ids``, ``output_token_logprobs_val``, ``finished``, ``out_list``, ``event``), its
``asyncio_tasks``, ``signal_handler_class`` / ``SignalHandler``, and the facts it keeps
(``model_config``, ``context_len``, ``server_args``). Those names are private and change between
releases without notice, so they are read here and nowhere else, and ``check_version`` refuses an
SGLang outside the range the GPU suite ran on (``TESTED``) before an engine is built.

``tests/gpu/traces/sglang-<version>.json`` holds what these readers saw on real SGLang
(``tests/gpu/record_sglang_traces.py`` records it on the GPU machine); a CPU test replays it
through this module, so a change in those shapes fails without a GPU.

Importing this module needs no SGLang: ``check_version`` and the readers take what they inspect
as arguments.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("rollwire.engines.sglang")

TESTED = ((0, 5, 15), (0, 6))  # [low, high): the GPU suite ran on 0.5.15 (tests/gpu/README, bench/results)
ANY_VERSION_ENV = "ROLLWIRE_SGLANG_ANY_VERSION"  # "1": run on an untested SGLang anyway, with a warning


class UnsupportedSGLangVersion(RuntimeError):
    """The installed SGLang is outside ``TESTED``; the adapter's use of its internals may not hold."""

    def __init__(self, found: str) -> None:
        low, high = (".".join(map(str, v)) for v in TESTED)
        super().__init__(f"sglang {found} is not supported: rollwire's SGLang adapter was tested on "
                         f">={low},<{high} (pip install 'rollwire[sglang]'); set {ANY_VERSION_ENV}=1 to run "
                         "on it anyway")
        self.found = found


def parse_version(text: str) -> tuple[int, ...]:
    """'0.5.15.post2' -> (0, 5, 15); the leading dotted numbers only (pre/post/dev tags ignored)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if m is None:
        raise UnsupportedSGLangVersion(text)
    return tuple(int(x) for x in m.group(1).split("."))


def check_version(found: str, environ: dict[str, str] | None = None) -> None:
    """Raise UnsupportedSGLangVersion unless ``TESTED[0] <= found < TESTED[1]``; with
    ``ROLLWIRE_SGLANG_ANY_VERSION=1`` log a warning instead."""
    low, high = TESTED
    try:
        ok = low <= parse_version(found) < high
    except UnsupportedSGLangVersion:
        ok = False
    if ok:
        return
    env = os.environ if environ is None else environ
    if env.get(ANY_VERSION_ENV, "") == "1":
        log.warning("sglang %s is outside the tested range (%s set): the adapter's use of its internals is "
                    "unchecked there", found, ANY_VERSION_ENV)
        return
    raise UnsupportedSGLangVersion(found)


# -- a request's ReqState (TokenizerManager.rid_to_state) ---------------------------------------------


def req_state(tm: Any, srid: str) -> Any:
    """The ReqState SGLang registered for ``srid`` (None if none): outputs are read from it, so several
    outputs that queued up between two reads are not lost."""
    return tm.rid_to_state.get(srid)


def is_live(tm: Any, srid: str) -> bool:
    """SGLang still holds ``srid`` (an aborted request stays until its abort came back)."""
    return srid in tm.rid_to_state


def state_ids(st: Any) -> list[int]:
    """Every token the request's current segment produced so far (grows in place)."""
    return st.output_ids  # type: ignore[no-any-return]


def state_logprobs(st: Any) -> list[float]:
    """Their logprobs, aligned with ``state_ids`` when the request asked for logprobs."""
    return st.output_token_logprobs_val  # type: ignore[no-any-return]


def state_finished(st: Any) -> bool:
    return bool(st.finished)


def end_as_aborted(st: Any) -> None:
    """Finish a ReqState from outside (SGLang's scheduler is dead, or shutdown gave up on it): the
    generate_request iterator waiting on it wakes and yields one final "abort" output."""
    if st.finished:
        return
    st.finished = True
    st.out_list.append({"output_ids": st.output_ids, "meta_info": {"finish_reason": {"type": "abort"}}})
    st.event.set()


class StateView:
    """A stand-in ReqState built from one output (only used if SGLang's state was not found)."""

    def __init__(self, out: Mapping[str, Any]) -> None:
        self.output_ids = out.get("output_ids") or []
        self.output_token_logprobs_val = [x[0] for x in out.get("meta_info", {}).get("output_token_logprobs") or []]
        self.finished = False


# -- one output of generate_request: {"output_ids": [...], "meta_info": {...}} --------------------------


def output_meta(out: Mapping[str, Any] | None) -> dict[str, Any]:
    return out["meta_info"] if out is not None else {}  # type: ignore[no-any-return]


def finish_type(meta: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """meta_info["finish_reason"] as (type, the whole dict): None while running; a dict with "type"
    (stop, length, abort) and, for an abort SGLang made itself, "status_code" and "message"."""
    fr = meta.get("finish_reason")
    if fr is None:
        return None, {}
    if isinstance(fr, dict):
        return str(fr.get("type")), fr
    return str(fr), {}


def cached_tokens(meta: Mapping[str, Any]) -> int:
    """Prompt tokens SGLang's radix cache served (first output of a request)."""
    return int(meta.get("cached_tokens") or 0)


# -- the TokenizerManager's process-level parts --------------------------------------------------------


def engine_facts(tm: Any) -> dict[str, Any]:
    """What the running engine decided: vocab_size and dtype (model_config), context_len, and
    whether the overlap scheduler is off (SGLang may switch it off itself). Missing ones are left out."""
    facts: dict[str, Any] = {}
    mc = getattr(tm, "model_config", None)
    if mc is not None:
        if hasattr(mc, "vocab_size"):
            facts["vocab_size"] = int(mc.vocab_size)
        if hasattr(mc, "dtype"):
            facts["dtype"] = str(mc.dtype).removeprefix("torch.")
    ctx = getattr(tm, "context_len", None)
    if ctx:
        facts["context_len"] = int(ctx)
    sa = getattr(tm, "server_args", None)
    if sa is not None and hasattr(sa, "disable_overlap_schedule"):
        facts["disable_overlap_schedule"] = bool(sa.disable_overlap_schedule)
    return facts


async def max_running_requests(tm: Any) -> int | None:
    """SGLang's running-batch limit (its scheduler sizes it from memory at start), summed over its
    data-parallel ranks, from the schedulers' internal state; None if this SGLang does not say."""
    # shielded: a cancelled get_internal_state leaves SGLang's communicator marked busy, and every
    # later one (each pause's scheduler round trip) would wait forever
    call = asyncio.ensure_future(tm.get_internal_state())
    try:
        async with asyncio.timeout(30):
            states = await asyncio.shield(call)
    except Exception as e:  # an SGLang without it: no fair admission (see admission.py)
        log.warning("sglang: no max_running_requests from get_internal_state (%r): no fair admission", e)
        return None
    key = "effective_max_running_requests_per_dp"
    ranks = states if isinstance(states, list) else [states]
    limits = [s.get(key) if isinstance(s, dict) else None for s in ranks]
    if not limits or not all(isinstance(v, int) and v > 0 for v in limits):
        return None
    return sum(limits)  # type: ignore[arg-type]


def cancel_background_tasks(tm: Any) -> None:
    """The TokenizerManager's own tasks on this loop (its receive loop, watchdogs)."""
    for task in list(getattr(tm, "asyncio_tasks", ())):
        task.cancel()


def replace_signal_handlers(tm: Any, on_sigterm: Callable[[], None], on_sigquit: Callable[[], None]) -> bool:
    """The TokenizerManager installs a SIGTERM handler that drains and kills the process tree and a
    SIGQUIT handler (a scheduler died) that SIGKILLs it: route both to ``on_sigterm`` / ``on_sigquit``
    instead. False where this SGLang has no replaceable handler class."""
    from sglang.srt.managers import tokenizer_manager as tm_mod

    base = getattr(tm_mod, "SignalHandler", None)
    if base is None or not hasattr(tm, "signal_handler_class"):
        return False

    class _Handler(base):  # type: ignore[misc, valid-type]
        def sigterm_handler(self, signum: Any = None, frame: Any = None) -> None:
            on_sigterm()

        def running_phase_sigquit_handler(self, signum: Any = None, frame: Any = None) -> None:
            on_sigquit()  # a loop signal handler: runs on the loop

    tm.signal_handler_class = _Handler
    return True
