"""The shared kernel: what the SDK and the server both speak, and nothing else.

    errors    the one error table (exception class -> status code + ErrorInfo reason)
    dtypes    DType enum values of torch dtypes; shape validation          (no protobuf)
    buffers   tensor memory as bytes: byte views, raw copies, receive buffers  (no protobuf)
    state     many tensors in one aligned buffer (PullState / PushState)     (no protobuf)
    tensors   Tensor / TensorChunk / Value messages <-> torch
    frames    the same wire format written and read by hand for bulk bytes
    index     torch indices <-> IndexItem messages

The generated code lives beside it in paramhub.v1. Nothing here imports grpc, and this
`__init__` imports nothing, so the server's torch-only core can use the protobuf-free modules.
"""
