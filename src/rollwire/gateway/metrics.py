"""/metrics in Prometheus' text format: the gateway's own counters, and every counter each server
already reports in its status (requests, tokens, in flight, live weight version, weight loads,
load and pause seconds...), labelled by endpoint. Over a fleet, also the fleet client's own view of
each server (admitted, samples in flight, requests routed, tokens, failures, evictions; labelled by
endpoint) and its failover totals."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from rollwire.messages import StatusReply

if TYPE_CHECKING:
    from rollwire.gateway.core import Gateway

_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _name(raw: str) -> str:
    return _BAD.sub("_", raw)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class GatewayMetrics:
    """Counters (monotonic) and gauges of the gateway, each with optional labels."""

    def __init__(self) -> None:
        self.counters: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.help: dict[str, str] = {}

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += by

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[(name, tuple(sorted(labels.items())))] = value

    def render(self, servers: dict[str, StatusReply | None], fleet: dict[str, Any] | None = None) -> str:
        lines: list[str] = []
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            seen: set[str] = set()
            for (name, labels), value in sorted(table.items()):
                full = f"rollwire_gateway_{name}"
                if full not in seen:
                    seen.add(full)
                    lines.append(f"# TYPE {full} {kind}")
                lines.append(f"{full}{_labels(dict(labels))} {value:g}")
        lines.append("# TYPE rollwire_server_up gauge")
        for ep, st in servers.items():
            lines.append(f"rollwire_server_up{_labels({'endpoint': ep})} {int(st is not None)}")
        series: defaultdict[str, list[str]] = defaultdict(list)
        for ep, st in servers.items():
            if st is None:
                continue
            lab = _labels({"endpoint": ep})
            series["rollwire_live_weight_version"].append(f"rollwire_live_weight_version{lab} {st.weight_version}")
            series["rollwire_server_in_flight"].append(f"rollwire_server_in_flight{lab} {st.in_flight}")
            named: dict[str, float] = {}
            for raw, value in sorted(st.counters.items()):
                # names that differ only in characters Prometheus does not take ("engine.x" beside
                # "engine_x") would be one series twice, which the text format forbids: the first stays
                named.setdefault(f"rollwire_server_{_name(raw)}", value)
            for name, value in named.items():
                series[name].append(f"{name}{lab} {value:g}")
        for name, rows in sorted(series.items()):
            lines.append(f"# TYPE {name} {'gauge' if name.endswith(('version', 'in_flight')) else 'untyped'}")
            lines += rows
        if fleet is not None:
            lines += _fleet_lines(fleet)
        return "\n".join(lines) + "\n"


_FLEET_SERVER = (("alive", "gauge"), ("version", "gauge"), ("in_flight", "gauge"), ("routed", "counter"),
                 ("tokens", "counter"), ("failures", "counter"), ("evictions", "counter"))


def _fleet_lines(fleet: dict[str, Any]) -> list[str]:
    """``fleet``: {"servers": RolloutFleet.stats(), "failovers", "tokens_carried", "current_version"}."""
    lines: list[str] = []
    for key, kind in _FLEET_SERVER:
        name = f"rollwire_fleet_server_{key}"
        lines.append(f"# TYPE {name} {kind}")
        for ep, row in sorted(fleet["servers"].items()):
            lines.append(f"{name}{_labels({'endpoint': ep})} {float(row[key]):g}")
    for key, kind in (("failovers", "counter"), ("tokens_carried", "counter"), ("current_version", "gauge")):
        name = f"rollwire_fleet_{key}"
        lines += [f"# TYPE {name} {kind}", f"{name} {float(fleet[key]):g}"]
    return lines


ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})


class CountingMiddleware:
    """Requests in flight, by route and status, and their seconds (a stream's until its last
    byte). Plain ASGI: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) costs a task group
    and a body stream per request, a third of the gateway's time per request at concurrency 64."""

    def __init__(self, app: Any, gw: Gateway) -> None:
        self.app, self.gw = app, gw

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw = self.gw
        gw.in_flight += 1
        gw.metrics.set("http_in_flight", gw.in_flight)
        t0 = time.perf_counter()
        status = 500

        async def send_counted(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            gw.in_flight -= 1
            gw.metrics.set("http_in_flight", gw.in_flight)
            path: str = scope["path"]
            # a fixed label set: a stranger's made-up paths must not grow the metrics without bound
            route = path if path in ROUTES else ("/v1/sessions" if path.startswith("/v1/sessions/") else "other")
            gw.metrics.inc("http_requests_total", route=route, status=str(status))
            gw.metrics.inc("http_request_seconds_sum", time.perf_counter() - t0, route=route)
