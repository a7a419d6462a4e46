"""ZeroMQ plumbing: configured sockets, request/reply with streaming, tensors as frames."""
