"""The head of an shm arena: how far the trainer has written a version, and its checksums.

The trainer announces a version before it packs it, and a receiver copies each 1 MiB piece as soon
as the trainer has written it: the pack and the load overlap, and the announcement, the pause and
the messages between the actors happen while the trainer is still copying. Progress lives in the
arena itself, as int64 words at offset 0 (buckets start after ``header_bytes``):

    word 0  MAGIC
    word 1  the push's stamp (written first; increasing for the arena's life, never 0)
    word 2  state: 0 while packing, the stamp once every piece and checksum is written, -stamp if
            the trainer gave the version up (its pack failed, or the push was cancelled)
    word 3  pieces P, word 4 buckets B, words 5-7 zero
    words 8 .. 8+P-1      one per checksum piece (buckets in order, 1 MiB pieces from each
                          bucket's first byte): the stamp once the piece is written and hashed
    words 8+P .. 8+P+B-1  each bucket's checksum (``checksum.py``), valid once the state is the stamp

A word is one aligned 8-byte store, and the trainer stores a piece's flag after its bytes: a
receiver that sees the flag reads the piece whole (x86 keeps stores in order; on a weaker memory
model a torn read is what the end-to-end checksum catches: the version fails, it is never loaded
silently wrong). The trainer rewrites an arena only after every receiver reported the previous
version (a failed push retires it: ``ShmSender.failed``), so a piece is never the next version's.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Sequence

import torch

from rollwire.messages.errors import ErrorCode
from rollwire.weightsync.checksum import PIECE_BYTES
from rollwire.weightsync.layout import StagingError

MAGIC = int.from_bytes(b"rwshm001", "little")
_FIRST_PIECE = 8  # word index of piece 0's flag
# A piece takes ~0.1 ms to write on one thread: a waiter looks again after about that long, then
# less often (up to 1 ms) while the trainer is further behind. Looking more often steals the cores
# the trainer packs on where they are few (2 cores: 50 us polls made the push 7% slower).
FIRST_POLL_S, MAX_POLL_S = 100e-6, 1e-3
_PAGE = 4096


def pieces_of(nbytes: Sequence[int]) -> list[int]:
    """Checksum pieces of each bucket (a bucket of 0 bytes has none)."""
    return [-(-n // PIECE_BYTES) for n in nbytes]


def header_bytes(n_pieces: int, n_buckets: int) -> int:
    """Bytes the header takes at the arena's start (whole pages: buckets start page-aligned)."""
    words = _FIRST_PIECE + n_pieces + n_buckets
    return -(-words * 8 // _PAGE) * _PAGE


def _words(base: torch.Tensor, n_pieces: int, n_buckets: int) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * (_FIRST_PIECE + n_pieces + n_buckets)).from_address(base.data_ptr())


class HeaderWriter:
    """Trainer side: announces progress in its own (writable) arena ``base`` for push ``stamp``."""

    def __init__(self, base: torch.Tensor, stamp: int, bucket_nbytes: Sequence[int]) -> None:
        self._base = base  # keeps the mapping alive while words are written
        self.stamp = stamp
        self.n_pieces, self.n_buckets = sum(pieces_of(bucket_nbytes)), len(bucket_nbytes)
        self._w = _words(base, self.n_pieces, self.n_buckets)
        self._state_lock = threading.Lock()  # complete (the pack's thread) against give_up (the loop)
        self._given_up = self._complete = False
        self._w[1] = stamp  # first: a reader of an older push sees it superseded from here on
        self._w[2] = 0
        # the flags: where this header is longer than the last one, its words lie on that push's
        # bucket bytes, and any int64 there equal to the stamp would read as "written"
        ctypes.memset(ctypes.addressof(self._w) + 8 * _FIRST_PIECE, 0, 8 * self.n_pieces)
        self._w[3], self._w[4] = self.n_pieces, self.n_buckets
        self._w[0] = MAGIC

    def piece_written(self, index: int) -> None:
        """Piece ``index`` (global, buckets in order) is written and hashed (any thread)."""
        self._w[_FIRST_PIECE + index] = self.stamp

    def complete(self, checksums: Sequence[int]) -> None:
        """Every piece is written: the checksums, then the state (unless the push was given up
        meanwhile: a cancelled push whose pack ran on stays given up)."""
        with self._state_lock:
            if self._given_up:
                return
            for b, c in enumerate(checksums):
                self._w[_FIRST_PIECE + self.n_pieces + b] = c
            self._w[2] = self.stamp
            self._complete = True

    def give_up(self) -> None:
        """Receivers waiting for pieces fail the version now instead of at their stall timeout. A
        complete version stays complete: a receiver still reading it (the push failed for another)
        reads whole bytes (the arena is retired, not rewritten)."""
        with self._state_lock:
            if self._complete:
                return
            self._given_up = True
            self._w[2] = -self.stamp


class HeaderReader:
    """Receiver side: waits for the pieces of push ``stamp`` in an attached (read-only) arena
    ``base``. Any thread may wait; the first failure fails every later wait at once."""

    def __init__(self, base: torch.Tensor, stamp: int, bucket_nbytes: Sequence[int], stall_timeout_s: float) -> None:
        counts = pieces_of(bucket_nbytes)
        self.first_piece = [0, *itertools.accumulate(counts)][:-1]  # global index of each bucket's piece 0
        self.stamp, self.stall_timeout_s = stamp, stall_timeout_s
        self.n_pieces, self.n_buckets = sum(counts), len(counts)
        if base.numel() < header_bytes(self.n_pieces, self.n_buckets):
            raise StagingError(ErrorCode.BAD_FIELD, "the shm arena is smaller than its header")
        self._base = base
        self._w = _words(base, self.n_pieces, self.n_buckets)
        self.failure: StagingError | None = None
        self._cancelled = False
        self._checksums: list[int] | None = None
        self._check()  # the stamp first: a later push may have laid the arena out otherwise
        if self._w[0] != MAGIC or (self._w[3], self._w[4]) != (self.n_pieces, self.n_buckets):
            raise StagingError(ErrorCode.BAD_FIELD, "the shm arena's header does not describe this version")

    def cancel(self) -> None:
        """Whoever waited has gone (a cancelled staging): a thread still waiting stops at its next look."""
        self._cancelled = True

    def _check(self) -> None:
        if self.failure is None:
            if self._w[1] != self.stamp:
                self._fail(ErrorCode.SUPERSEDED, f"the trainer rewrites the shm arena (push {self._w[1]}, "
                                                 f"not {self.stamp})")
            elif self._w[2] == -self.stamp:
                self._fail(ErrorCode.WEIGHTS_FAILED, "the trainer gave the version up while writing it")
            elif self._cancelled:
                self._fail(ErrorCode.SUPERSEDED, "the wait for the trainer's bytes was cancelled")
        if self.failure is not None:
            raise self.failure

    def _fail(self, code: ErrorCode, message: str) -> None:
        if self.failure is None:
            self.failure = StagingError(code, message)
        raise self.failure

    def _wait(self, word: int) -> None:
        w, stamp = self._w, self.stamp
        if w[word] == stamp and w[1] == stamp and w[2] != -stamp and self.failure is None and not self._cancelled:
            return  # (a given-up version is not copied on: what is copied already stays)
        deadline = time.monotonic() + self.stall_timeout_s
        poll = FIRST_POLL_S
        while w[word] != stamp:
            self._check()
            if time.monotonic() > deadline:
                self._fail(ErrorCode.TIMEOUT, f"the trainer wrote nothing of the version for {self.stall_timeout_s}s")
            time.sleep(poll)
            poll = min(2 * poll, MAX_POLL_S)
        self._check()

    def wait_piece(self, bucket: int, k: int) -> None:
        """Block until piece ``k`` of ``bucket`` is written (StagingError: the trainer failed,
        rewrote the arena, or stalled)."""
        self._wait(_FIRST_PIECE + self.first_piece[bucket] + k)

    def checksums(self) -> list[int]:
        """Every bucket's checksum, once the trainer has written the whole version (read once: a
        complete version's checksums never change, and every bucket's check asks for them)."""
        if self._checksums is None:
            self._wait(2)
            base = _FIRST_PIECE + self.n_pieces
            self._checksums = [self._w[base + b] for b in range(self.n_buckets)]
        else:
            self._check()  # still this push's arena when asked again
        return self._checksums
