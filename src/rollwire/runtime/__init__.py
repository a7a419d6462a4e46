"""The actor runtime: Actor, ActorSystem, supervision, logging, counters."""

from rollwire.runtime.actor import Actor, Origin, Port
from rollwire.runtime.dispatch import handles
from rollwire.runtime.errors import RollwireError
from rollwire.runtime.system import ActorSystem, address

__all__ = ["Actor", "ActorSystem", "Origin", "Port", "RollwireError", "address", "handles"]
