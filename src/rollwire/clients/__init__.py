"""Clients: RolloutClient for rollout workers, TrainerPublisher for trainers."""

from rollwire.clients.rollout import (
    GenerateOutput,
    GenerationStream,
    RequestTimeout,
    RolloutClient,
    RolloutError,
)

__all__ = ["GenerateOutput", "GenerationStream", "RequestTimeout", "RolloutClient", "RolloutError"]
