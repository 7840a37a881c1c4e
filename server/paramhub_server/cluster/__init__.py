"""A paramhub cluster on torch.distributed: several ranks launched by torchrun, one front door.

    launch.py    torchrun environment -> per-rank settings, the gloo process group, addresses
    sharding.py  sharded models as each rank holds them: plans (fsdp, colwise / rowwise per
                 module) and their placements, Shard(d) region math, entries, writes
    engine.py    the SPMD command loop every rank runs (rank 0 orders every command) and the
                 commands: create, read, two-phase write, init, delete, info
    commands.py  the registry of commands defined in other modules (`@command("op")`)
    commit.py    a write's two-phase commit over the ranks (logged prepare, vote, logged
                 commit) and, at start, the resolution of writes left in doubt by a crash
    compute.py   compute on sharded models, SPMD: Forward, Backward, gradients
    optim.py     optimizers on sharded models: state sharded like its parameter, durable per rank
    compute_service.py  their gRPC handlers (a mixin of ClusterParameterService)
    storage.py   each rank's snapshot and log of its parts
    routed.py    routed writes: parts staged on their owners (StageShard), then committed
    service.py   gRPC: ClusterService, and the ParameterService handlers for sharded models

A plain `paramhub serve` uses service.py's handlers with no cluster: every call is the plain
handler's, and ClusterService answers as a cluster of one rank.
"""
