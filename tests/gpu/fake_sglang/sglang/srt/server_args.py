from __future__ import annotations

import dataclasses
from typing import Annotated as A


@dataclasses.dataclass
class ServerArgs:
    model_path: A[str, "path"] = ""
    skip_tokenizer_init: A[bool, ""] = False
    enable_custom_logit_processor: A[bool, ""] = False
    enable_memory_saver: A[bool, ""] = False
    enable_deterministic_inference: A[bool, ""] = False
    log_level: A[str, ""] = "error"
    attention_backend: A[str | None, ""] = None
    sampling_backend: A[str | None, ""] = None
    mem_fraction_static: A[float | None, ""] = None
    cuda_graph_max_bs_decode: A[int | None, ""] = None
    random_seed: A[int | None, ""] = None
    tp_size: A[int, ""] = 1
    dtype: A[str, ""] = "auto"
    context_length: A[int | None, ""] = None
    base_gpu_id: A[int, ""] = 0
    weight_version: A[str, ""] = "default"
    json_model_override_args: A[str, ""] = "{}"
    disable_radix_cache: A[bool, ""] = False
    max_running_requests: A[int | None, ""] = None
    custom_sigquit_handler: A[object | None, "installed for SIGQUIT in the engine's process"] = None
    fake_step_s: A[float, "seconds per decode step of the fake scheduler"] = 0.002
