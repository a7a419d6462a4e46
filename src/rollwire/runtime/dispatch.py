"""``@handles`` dispatch: a class marks its handlers by message type; ``handler_table`` collects them.

Actors (``runtime/actor.py``) and the trainer's ROUTER (``weightsync/publisher.py``) both dispatch
this way, each with its own handler signature; neither compares message types by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def handles(*types: type) -> Callable[[F], F]:
    """Mark a method as the handler of ``types``."""

    def mark(fn: F) -> F:
        fn.__rollwire_handles__ = types  # type: ignore[attr-defined]
        return fn

    return mark


def handler_table(cls: type) -> dict[type, str]:
    """Message type -> the name of the method that handles it, subclasses overriding bases."""
    table: dict[type, str] = {}
    for klass in reversed(cls.__mro__):
        for attr, fn in vars(klass).items():
            for t in getattr(fn, "__rollwire_handles__", ()):
                table[t] = attr
    return table
