"""Many rollout servers as one: client-side routing, health and failover (``RolloutFleet``)."""

from rollwire.fleet.client import NoLiveServer, RolloutFleet
from rollwire.fleet.routing import Router, ServerView

__all__ = ["NoLiveServer", "RolloutFleet", "Router", "ServerView"]
