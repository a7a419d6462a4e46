"""Clients: RolloutClient for rollout workers, with sessions (TrainerPublisher is in rollwire.weightsync)."""

from rollwire.clients.rollout import (
    GenerateOutput,
    GenerationStream,
    RequestTimeout,
    RolloutClient,
    RolloutError,
)
from rollwire.clients.session import Session, SessionDesynced, Trajectory, TurnRecord

__all__ = ["GenerateOutput", "GenerationStream", "RequestTimeout", "RolloutClient", "RolloutError", "Session",
           "SessionDesynced", "Trajectory", "TurnRecord"]
