"""Fixtures of the SGLangEngine tests against the SGLang stand-in: the adapter module imported with
the stand-in first on the path (dropped again afterwards), and a started engine on a tiny
checkpoint."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.gpu.fake_engine import FAKE, SHAPE


@pytest.fixture(scope="module")
def sglang_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, str]]:
    from tests.gpu.common import write_qwen2

    ckpt = write_qwen2(str(tmp_path_factory.mktemp("ckpt")), SHAPE, dtype="bfloat16")
    sys.path.insert(0, FAKE)
    try:
        import rollwire.engines.sglang as mod

        yield mod, ckpt
    finally:
        sys.path.remove(FAKE)
        ours = ("sglang", "rollwire.engines.sglang")  # and their submodules: all were bound to the stand-in
        for name in [n for n in sys.modules if n in ours or n.startswith(("sglang.", "rollwire.engines.sglang."))]:
            del sys.modules[name]


@pytest.fixture
async def eng(sglang_module: tuple[object, str]) -> AsyncIterator[object]:
    mod, ckpt = sglang_module
    e = mod.SGLangEngine(ckpt, engine_args={"fake_step_s": "0.002"})  # type: ignore[attr-defined]
    await e.start()
    yield e
    await e.shutdown()
