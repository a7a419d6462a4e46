"""What the GPU scripts (run_gpu.sh, run_cuda_ipc.sh) check first: the packages they import and a
CUDA GPU. Prints the versions; exits non-zero if one is missing."""

import importlib

import torch

for name in ("zmq", "msgspec", "uvloop", "structlog", "transformers"):
    print(name, getattr(importlib.import_module(name), "__version__", "ok"))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0), torch.__version__)
