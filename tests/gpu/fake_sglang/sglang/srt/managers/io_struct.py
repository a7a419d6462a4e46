from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerateReqInput:
    input_ids: list | None = None
    sampling_params: dict | None = None
    return_logprob: bool = False
    stream: bool = False
    rid: str | None = None
    extra_key: str | None = None
    custom_logit_processor: str | None = None


@dataclass
class PauseGenerationReqInput:
    mode: str = "abort"


@dataclass
class ContinueGenerationReqInput:
    torch_empty_cache: bool = True


@dataclass
class UpdateWeightsFromTensorReqInput:
    serialized_named_tensors: list = field(default_factory=list)
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


@dataclass
class InitWeightsUpdateGroupReqInput:
    master_address: str = ""
    master_port: int = 0
    rank_offset: int = 1
    world_size: int = 2
    group_name: str = "weight_update_group"
    backend: str = "nccl"


@dataclass
class DestroyWeightsUpdateGroupReqInput:
    group_name: str = "weight_update_group"


@dataclass
class UpdateWeightsFromDistributedReqInput:
    names: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


@dataclass
class ReleaseMemoryOccupationReqInput:
    tags: list | None = None


@dataclass
class ResumeMemoryOccupationReqInput:
    tags: list | None = None


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


Any = Any
