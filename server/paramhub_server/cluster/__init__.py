"""A paramhub cluster on torch.distributed: several ranks launched by torchrun, one front door.

    launch.py    torchrun environment -> per-rank settings, the gloo process group, addresses
    engine.py    torch only: sharded models (DTensor Shard(0) over the ranks) and the SPMD
                 command loop every rank runs; rank 0 orders every command
    service.py   gRPC: ClusterService, and the ParameterService handlers for sharded models

A plain `paramhub serve` never imports this package.
"""
