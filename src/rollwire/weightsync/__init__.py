"""Weight sync: how a trainer's weights become a version the engine loads.

Layers inside the package, bottom to top: ``checksum`` and ``layout`` (buckets, dtypes, staging
errors); one module per payload transport (``inline``, ``shm``, ``cuda_ipc``, ``broadcast``), each
with a trainer half (prepare a version) and a receiver half (stage it into tensors); ``push`` (one
push's bookkeeping) and ``publisher`` (``TrainerPublisher``, what a trainer uses). ZeroMQ plumbing
stays in ``rollwire.transports``; the wire types in ``rollwire.messages.weights``.
"""
