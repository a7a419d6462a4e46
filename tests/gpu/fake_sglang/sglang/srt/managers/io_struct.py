from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class GenerateReqInput:
    input_ids: Optional[list] = None
    sampling_params: Optional[dict] = None
    return_logprob: bool = False
    stream: bool = False
    rid: Optional[str] = None
    extra_key: Optional[str] = None
    custom_logit_processor: Optional[str] = None


@dataclass
class PauseGenerationReqInput:
    mode: str = "abort"


@dataclass
class ContinueGenerationReqInput:
    torch_empty_cache: bool = True


@dataclass
class UpdateWeightsFromTensorReqInput:
    serialized_named_tensors: list = field(default_factory=list)
    load_format: Optional[str] = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None


@dataclass
class ReleaseMemoryOccupationReqInput:
    tags: Optional[list] = None


@dataclass
class ResumeMemoryOccupationReqInput:
    tags: Optional[list] = None


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


Any = Any
