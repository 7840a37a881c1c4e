"""The server's API layer: gRPC requests -> core calls -> gRPC responses.

    service.py      ParameterService, combining the handler classes below
    base.py         what the handlers share (registry, transport, limits, name lookups)
    serde.py        resource names, enum maps, proto <-> core conversions
    framing.py      header-then-chunks request streams, chunk sizes
    models.py       CreateModel, DeleteModel, ListModels, DescribeModel, ListParameters,
                    WatchModel, Probe
    tensors.py      GetTensor, GetTensorInline, SetSlice, StreamSetSlice, PullState, PushState,
                    GetTransportInfo (every transfer path)
    writes.py       ApplyInit, ApplyBatch
    compute.py      Forward, Backward, ZeroGrad, SetTrainingMode, CheckShared
    training.py     optimizers, ConfigureTraining, PullModel, PushGrads
    checkpoints.py  checkpoints and compaction
"""
