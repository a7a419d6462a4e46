"""Health and status: cheap requests any client may send to the rollout socket."""

from __future__ import annotations

import msgspec


class HealthRequest(msgspec.Struct, frozen=True, kw_only=True, tag="health", array_like=True):
    pass


class HealthReply(msgspec.Struct, frozen=True, kw_only=True, tag="health_ok", array_like=True):
    weight_version: int
    governor_state: str  # SERVING, LOADING, ... (see MemoryGovernor); INCOMPLETE: see docs/protocol.md
    protocol: int
    session_endpoint: str = ""  # where the SessionActor listens ("": no sessions on this server)


class StatusRequest(msgspec.Struct, frozen=True, kw_only=True, tag="status", array_like=True):
    pass


class StatusReply(msgspec.Struct, frozen=True, kw_only=True, tag="status_ok", array_like=True):
    engine: str
    model: str
    weight_version: int
    governor_state: str
    in_flight: int
    max_new_tokens_limit: int
    vocab_size: int
    counters: dict[str, float]
    max_model_len: int = 0  # prompt + new tokens of one sequence (0: not reported by an older server)


class ParamsRequest(msgspec.Struct, frozen=True, kw_only=True, tag="params", array_like=True):
    """What a trainer must send: the server's parameters (docs/protocol.md section 11.6)."""


class ParamSpec(msgspec.Struct, frozen=True, array_like=True, gc=False):
    name: str
    dtype: str  # torch dtype name without "torch.", as in TensorMeta
    shape: list[int]
    # part of a complete version: a version must name every required parameter after a weights
    # release (incomplete_version otherwise); a tied alias (lm_head.weight sharing the embedding) is not
    required: bool


class ParamsReply(msgspec.Struct, frozen=True, kw_only=True, tag="params_ok", array_like=True):
    weight_version: int
    params: list[ParamSpec]  # empty: the engine cannot tell (e.g. a checkpoint without a safetensors header)


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="heartbeat", array_like=True, gc=False):
    """Liveness, both ways, on every client socket (rid 0). A client sends one when it has sent
    nothing for a heartbeat interval; the server answers each at once. Any traffic counts as a
    beat: a client with calls pending that hears nothing for its liveness bound fails them with
    SERVER_UNAVAILABLE. A client that has sent a Heartbeat has opted in: once it is silent for
    ``--client-timeout``, the server aborts its requests and frees its waiting requests and
    sessions (a client that never beats is not judged by silence)."""
