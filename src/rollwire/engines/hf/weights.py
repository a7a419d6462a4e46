"""The live parameters of the hf engine: loaded in place by name, released and restored.

Loading never builds a new model or new tensors: each tensor is copied into the existing
parameter (``param.data.copy_``), so data pointers stay put. Releasing frees the storage for real
(``param.data = torch.empty(0)``; on CPU glibc is asked to return the freed heap) and keeps the
shapes and dtypes; restoring allocates storage of those shapes again, with undefined contents
until weights are re-sent (SGLang's release_memory_occupation semantics). Until every parameter
has been loaded again, a load that leaves one undefined is refused (``incomplete_version``) and
``undefined`` says how many remain, so nothing is generated from uninitialised memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from rollwire.engines.base import EngineError
from rollwire.messages.control import ParamSpec
from rollwire.messages.errors import ErrorCode
from rollwire.weightsync.layout import StagingError
from rollwire.weightsync.memcopy import (
    ByteCheck,
    PartlyCopied,
    byte_copyable,
    copy_bytes,
    copy_pool,
    copy_threads,
    copy_verified,
)


class WeightStore:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        # every name, tied ones included (lm_head.weight and embed_tokens.weight may be one tensor)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self._distinct = {id(p): (p, tuple(p.shape), p.dtype) for p in self.params.values()}
        self.released = False
        self._undefined: set[int] = set()  # ids of parameters restored but not loaded since

    def specs(self) -> list[ParamSpec]:
        """Every name, in the model's order; of names sharing one tensor only the first is required."""
        first: set[int] = set()
        out = []
        for name, p in self.params.items():
            _, shape, dtype = self._distinct[id(p)]  # as loaded at start: a released parameter's shape is (0,)
            out.append(ParamSpec(name, str(dtype).removeprefix("torch."), list(shape), id(p) not in first))
            first.add(id(p))
        return out

    def resident_bytes(self) -> int:
        return sum(p.untyped_storage().nbytes() for p, _, _ in self._distinct.values())

    def check(self, items: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """All of ``items`` as a list, or EngineError for the first bad one (nothing is applied)."""
        if self.released:
            raise EngineError(ErrorCode.WEIGHTS_FAILED, "weights are released: resume_memory(['weights']) first")
        checked = list(items)
        for name, t in checked:
            param = self.params.get(name)
            if param is None:
                raise EngineError(ErrorCode.UNKNOWN_TENSOR, f"no parameter named {name!r}")
            if tuple(t.shape) != tuple(param.shape):
                raise EngineError(ErrorCode.SHAPE_MISMATCH, f"{name}: got {tuple(t.shape)}, want {tuple(param.shape)}")
            if t.dtype != param.dtype:
                raise EngineError(ErrorCode.DTYPE_MISMATCH, f"{name}: got {t.dtype}, want {param.dtype}")
        missing = self._undefined - {id(self.params[name]) for name, _ in checked} if self._undefined else None
        if missing:
            first = next(n for n, p in self.params.items() if id(p) in missing)
            raise EngineError(ErrorCode.INCOMPLETE_VERSION,
                              f"{len(missing)} of {len(self._distinct)} parameters hold no weights since the "
                              f"release (e.g. {first!r}); a load after a release must send every tensor")
        return checked

    @property
    def undefined(self) -> int:
        """Parameters whose storage was restored but not loaded since (their contents are garbage)."""
        return len(self._undefined)

    def copy(self, items: list[tuple[str, torch.Tensor]], checks: Sequence[ByteCheck] = ()) -> None:
        """Copy checked tensors into the live parameters (any device; runs on the worker). ``checks``:
        buckets holding the tensors' bytes, not verified yet: hashed in the same pass as the copy. A
        failed check after bytes were copied leaves every parameter undefined (nothing is generated
        until a whole version loads) and raises ``bad_checksum``."""
        pairs = [(self.params[name].data, t) for name, t in items]
        plain = [(d, t) for d, t in pairs if byte_copyable(d, t)]
        if checks:  # verified as copied; with nothing to copy here, verified before anything is copied
            try:
                bad = copy_verified(plain, checks, copy_pool(), copy_threads())
            except StagingError as e:  # the trainer stopped writing the bytes (shm) before any was copied
                raise EngineError(e.code, e.message) from None
            except PartlyCopied as e:  # ... or after: part of them is in the parameters
                self._undefined = set(self._distinct)
                cause = e.__cause__
                code = cause.code if isinstance(cause, StagingError) else ErrorCode.WEIGHTS_FAILED
                raise EngineError(code, f"{getattr(cause, 'message', cause)}; the parameters hold part of that "
                                        "version: nothing is generated until a whole version loads") from None
            if bad and plain:
                self._undefined = set(self._distinct)
            if bad:
                raise EngineError(ErrorCode.BAD_CHECKSUM, f"bucket(s) {bad} do not match their announced checksums"
                                  + ("; the parameters hold part of that version: nothing is generated until a "
                                     "whole version loads" if plain else ""))
        elif plain:  # CPU bytes: memmove pieces on several threads (weightsync/memcopy.py says why)
            copy_bytes(plain, copy_pool(), copy_threads())
        with torch.no_grad():
            for d, t in pairs:
                if not byte_copyable(d, t):
                    d.copy_(t)
        self._undefined.difference_update(id(self.params[name]) for name, _ in items)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with torch.no_grad():
            for p, _, dtype in self._distinct.values():
                p.data = torch.empty(0, dtype=dtype, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _return_freed_heap_to_os()

    def restore(self) -> None:
        if not self.released:
            return
        with torch.no_grad():
            for p, shape, dtype in self._distinct.values():
                p.data = torch.empty(shape, dtype=dtype, device=self.device)
        self.released = False
        self._undefined = set(self._distinct)


def _return_freed_heap_to_os() -> None:
    """glibc keeps freed blocks below its (dynamic) mmap threshold in the heap; malloc_trim hands
    them back, so a released CPU model really lowers RSS. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
