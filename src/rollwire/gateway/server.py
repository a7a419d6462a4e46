"""``rollwire gateway``: the OpenAI face as its own process (uvicorn on one port)."""

from __future__ import annotations

import argparse
import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # FastAPI is an extra: `rollwire serve` must run without it
    from rollwire.gateway.core import GatewayConfig


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    from rollwire.cli import port, positive_int, positive_seconds

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--rollout-endpoint", action="append", default=[],
                   help="a rollout server (rollwire serve); repeat it for several: they run as one RolloutFleet "
                        "(routing, failover, sessions that move when their server dies)")
    p.add_argument("--model", default="tiny", help="tokenizer + chat template: 'tiny[:SEED]' or a local checkpoint dir")
    p.add_argument("--served-model-name", default="", help="the name clients pass as model (default: --model)")
    p.add_argument("--api-key", action="append", default=[],
                   help="accepted bearer keys (repeatable); each key owns its sessions. None: no auth")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    p.add_argument("--max-body-bytes", type=positive_int, default=8 << 20)
    p.add_argument("--default-max-tokens", type=positive_int, default=1024)
    p.add_argument("--session-max-tokens", type=positive_int, default=16384)
    p.add_argument("--session-ttl", type=positive_seconds, default=600.0)
    p.add_argument("--max-sessions", type=positive_int, default=4096)
    p.add_argument("--request-timeout", type=positive_seconds, default=600.0)
    p.add_argument("--start-timeout", type=positive_seconds, default=120.0,
                   help="seconds to wait for a rollout server at start; then exit 3")


def gateway_config(a: argparse.Namespace) -> GatewayConfig:
    from rollwire.gateway.core import GatewayConfig

    return GatewayConfig(endpoints=a.rollout_endpoint or ["tcp://127.0.0.1:7500"], model=a.model,
                         served_model_name=a.served_model_name, api_keys=a.api_key, max_body_bytes=a.max_body_bytes,
                         default_max_tokens=a.default_max_tokens, session_max_tokens=a.session_max_tokens,
                         session_ttl_s=a.session_ttl, max_sessions=a.max_sessions,
                         request_timeout_s=a.request_timeout, start_timeout_s=a.start_timeout)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_gateway(a: argparse.Namespace) -> int:
    try:
        import uvicorn

        from rollwire.gateway.app import build_app
        from rollwire.gateway.chat import ChatFormat, load_tokenizer
        from rollwire.gateway.core import Gateway
    except ImportError as e:
        raise SystemExit(f"rollwire gateway needs the gateway extra: pip install 'rollwire[gateway]' ({e})") from None
    if not _loopback(a.host) and not a.api_key and not a.insecure:
        raise SystemExit(f"--host {a.host} is not loopback: pass --api-key (or --insecure)")
    cfg = gateway_config(a)
    gw = Gateway(cfg, ChatFormat(load_tokenizer(cfg.model)))
    server = uvicorn.Server(uvicorn.Config(build_app(gw), host=a.host, port=a.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    gw.should_stop = lambda: server.should_exit  # SIGTERM / Ctrl-C while it waits for a server at start
    gw.request_exit = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopped as asked, no traceback
        return 130
    return 0 if server.started and gw.start_error is None else 3
