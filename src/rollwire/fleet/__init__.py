"""Many rollout servers as one: client-side routing, health and failover (``RolloutFleet``)."""

from rollwire.fleet.client import FleetStream, NoLiveServer, RolloutFleet
from rollwire.fleet.ray_launcher import RayLauncher, ServerInfo  # imports ray only when a launcher starts
from rollwire.fleet.routing import Router, ServerView
from rollwire.fleet.session import FleetSession

__all__ = ["FleetSession", "FleetStream", "NoLiveServer", "RayLauncher", "RolloutFleet", "Router", "ServerInfo",
           "ServerView"]
