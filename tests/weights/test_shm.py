"""The shared-memory arena: created once, reused, grown on demand, unlinked by its owner only."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from rollwire.weightsync import shm
from tests.weights.procs import attach_and_sum, create_arena_and_wait


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


def test_the_arena_is_created_once_and_reused_until_a_push_needs_more_bytes() -> None:
    arena = shm.ShmArena()
    try:
        assert arena.reserve(3 << 20) is True
        first = arena.name
        for n in (3 << 20, 1 << 20, 4 << 20):  # 4 MiB still fits: sizes are rounded up to 2 MiB
            assert arena.reserve(n) is False
        assert arena.name == first and arena.created == 1
        assert arena.reserve(5 << 20) is True
        assert arena.name != first and arena.created == 2
        assert not exists(first), "the outgrown segment is unlinked"
        assert exists(arena.name)
    finally:
        arena.close()
    assert not exists(arena.name or "x") and arena.name == ""


def test_a_receiver_process_that_attaches_and_exits_does_not_unlink_the_trainers_arena() -> None:
    arena = shm.ShmArena()
    arena.reserve(1 << 20)
    arena.tensor[:1024] = 2
    try:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        p = ctx.Process(target=attach_and_sum, args=(arena.name, out))
        p.start()
        assert out.get(timeout=60) == 2048
        p.join(30)
        assert p.exitcode == 0
        assert exists(arena.name), "Python's resource_tracker must not unlink it when the receiver exits"
    finally:
        arena.close()


def test_an_attachment_keeps_reading_after_the_trainer_unlinks_and_a_new_name_cannot_be_attached() -> None:
    arena = shm.ShmArena()
    arena.reserve(1 << 20)
    arena.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    name = arena.name
    view = shm.attach(name).tensor[:4]
    arena.close()
    shm.detach_all()
    assert view.tolist() == [1, 2, 3, 4]  # the mapping lives as long as a view of it
    with pytest.raises(FileNotFoundError):
        shm.attach(name)


def test_attach_refuses_names_that_are_not_rollwire_arenas() -> None:
    for name in ("../etc/passwd", "rw-arena-1-2-3", "psm_abcdef"):
        with pytest.raises(ValueError, match="not a rollwire shm arena"):
            shm.attach(name)


def test_the_next_trainer_removes_the_arena_of_a_trainer_killed_with_sigkill() -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=create_arena_and_wait, args=(out,))
    p.start()
    name = out.get(timeout=60)
    p.kill()
    p.join(30)
    assert exists(name)
    assert name in shm.sweep_orphans()
    assert not exists(name)


def test_receiver_views_are_read_only_mappings() -> None:
    arena = shm.ShmArena()
    arena.reserve(1 << 20)
    try:
        attached = shm.attach(arena.name)
        assert attached.size == arena.size
        arena.tensor[10] = 9
        assert int(attached.tensor[10]) == 9  # same pages
    finally:
        arena.close()
        shm.detach_all()


def test_host_id_is_stable_within_a_machine() -> None:
    assert shm.host_id() == shm.host_id() and shm.host_id()
