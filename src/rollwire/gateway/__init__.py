"""The OpenAI face: an HTTP gateway (FastAPI + uvicorn) in front of rollwire servers.

It owns the tokenizer and the chat template, turns OpenAI requests into token requests through
the ordinary clients (``RolloutClient`` and its sessions), and keeps each tagged conversation's
exact token history, so a trainer gets the tokens the model produced, never a re-tokenization.

    rollwire gateway --port 8000 --rollout-endpoint tcp://127.0.0.1:7500 --model tiny

Modules: ``schemas`` (the request bodies), ``errors`` (OpenAI-shaped errors), ``chat`` (template,
tokenizer, detokenizer), ``tools`` (Hermes tool-call parsing), ``sessions`` (exact trajectories),
``metrics`` (Prometheus text), ``core`` (the gateway's state and sampling mapping), ``events``
(running a request's samples as events), ``render`` (OpenAI response shapes), ``app`` (the
routes), ``server`` (the process), ``client`` (a trainer's trajectory fetch).
"""

from rollwire.gateway.client import ChatTrajectory, ChatTurn, fetch_trajectory

__all__ = ["ChatTrajectory", "ChatTurn", "fetch_trajectory"]
