"""Engine arguments and checkpoint facts for the SGLang engine (no SGLang process is started here).

``--engine-arg key=value`` strings become typed ``sglang.Engine`` keyword arguments by the type of
the ServerArgs field; defaults may also come from the environment (``ROLLWIRE_SGLANG_ENGINE_ARGS``),
so that a machine whose SGLang build lacks some kernels (e.g. no flashinfer attention) can say so
once for every engine a process builds, test suites included.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Always set on the sglang.Engine: token ids in and out; masks and min_p need the custom logit processor.
FORCED_ARGS: dict[str, Any] = {"skip_tokenizer_init": True, "enable_custom_logit_processor": True}
# Defaults the caller (or ROLLWIRE_SGLANG_ENGINE_ARGS) may override.
DEFAULT_ARGS: dict[str, Any] = {"enable_memory_saver": True, "log_level": "warning"}
ENV_ARGS = "ROLLWIRE_SGLANG_ENGINE_ARGS"  # JSON object, or "key=value,key=value"


def _field_types() -> dict[str, str]:
    """ServerArgs field name -> its annotation as text (the module uses postponed annotations)."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    return {f.name: str(f.type) for f in dataclasses.fields(ServerArgs)}


def server_arg_types() -> dict[str, str]:
    """ServerArgs field name -> annotation text, of the SGLang installed (version gates use it)."""
    return _field_types()


def _base_type(annotation: str) -> str:
    """'A[Optional[int], "help"]' -> 'int'; 'A[List[str], ...]' -> 'list'; unknown -> 'str'."""
    t = annotation.replace(" ", "")
    m = re.match(r"(?:A|Annotated)\[(.*)", t)
    if m:
        t = m.group(1)
    t = re.sub(r"^Optional\[", "", t)
    for name, base in (("bool", "bool"), ("int", "int"), ("float", "float"), ("List", "json"), ("list", "json"),
                       ("Dict", "json"), ("dict", "json"), ("Tuple", "json"), ("tuple", "json")):
        if t.startswith(name):
            return base
    return "str"


def convert_engine_args(args: Mapping[str, object]) -> dict[str, Any]:
    """``--engine-arg key=value`` strings -> typed ``sglang.Engine`` keyword arguments.

    Keys may use dashes or underscores. Each value is converted by the type of the ServerArgs
    field (bool: true/false/1/0/yes/no; int; float; lists and dicts as JSON); "none"/"null" gives
    None. Non-string values pass through. An unknown key raises ValueError.
    """
    types = _field_types()
    out: dict[str, Any] = {}
    for raw_key, value in args.items():
        key = raw_key.replace("-", "_")
        if key not in types:
            raise ValueError(f"unknown sglang engine argument {raw_key!r} (see sglang's ServerArgs)")
        out[key] = _convert(key, value, _base_type(types[key])) if isinstance(value, str) else value
    return out


def env_engine_args(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The defaults named in ``ROLLWIRE_SGLANG_ENGINE_ARGS`` (unconverted; empty if unset)."""
    raw = (environ if environ is not None else os.environ).get(ENV_ARGS, "").strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        parsed = json.loads(raw)
        if not isinstance(parsed, dict):
            raise ValueError(f"{ENV_ARGS} must be a JSON object or key=value,key=value")
        return dict(parsed)
    out: dict[str, object] = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{ENV_ARGS}: {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _convert(key: str, value: str, base: str) -> Any:
    v = value.strip()
    if v.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            if v.lower() in ("true", "1", "yes", "on"):
                return True
            if v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(v)
        if base == "int":
            return int(v)
        if base == "float":
            return float(v)
        if base == "json":
            return json.loads(v)
    except ValueError:
        raise ValueError(f"engine argument {key}={value!r}: expected {base}") from None
    return value


# -- checkpoint facts (read without loading weights) -------------------------------------------------


@dataclass
class Checkpoint:
    vocab_size: int
    eos_token_ids: list[int]
    max_position_embeddings: int
    dtype: str
    tied_embeddings: bool
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype), empty if unknown
    nbytes: int  # bytes of all tensors in the checkpoint


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _weight_files(root: Path) -> list[Path]:
    """The model's safetensors files: those its index names when there is one (a repo may also ship
    another copy of the weights, e.g. Mistral's consolidated.safetensors), else all of them."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [root / n for n in names if (root / n).exists()]
    files = sorted(root.glob("*.safetensors"))
    plain = [f for f in files if not f.name.startswith("consolidated")]
    return plain or files


def read_checkpoint(path: str) -> Checkpoint:
    root = Path(path)
    cfg: dict[str, Any] = json.loads((root / "config.json").read_text())
    text: dict[str, Any] = cfg.get("text_config") or cfg
    eos: Any = text.get("eos_token_id", cfg.get("eos_token_id"))
    gen = root / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = [] if eos is None else [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    nbytes = 0
    for f in _weight_files(root):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = (tuple(meta["shape"]), _ST_DTYPES.get(meta["dtype"], meta["dtype"]))
            start, end = meta["data_offsets"]
            nbytes += end - start
    return Checkpoint(
        vocab_size=int(text["vocab_size"]), eos_token_ids=eos_ids,
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        dtype=str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "auto"),
        tied_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        tensors=tensors, nbytes=nbytes,
    )
