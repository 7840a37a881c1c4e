"""Per-RPC facts are declared once, as `(paramhub.v1.rpc)` options in the proto, and every table
that used to list RPC names by hand is derived from them."""

from __future__ import annotations

from paramhub import client
from paramhub.common import rpcs
from paramhub_server import admission, auth

# The hand-kept tables as they were before the options: the derived ones must equal them.
_ROLES_BEFORE = {
    "CreateModel": "admin", "DeleteModel": "admin", "ListModels": "read", "DescribeModel": "read",
    "ListParameters": "read", "GetTensor": "read", "SetSlice": "write", "StreamSetSlice": "write",
    "ApplyInit": "write", "Forward": "read", "CheckShared": "read", "SetTrainingMode": "write",
    "Probe": "read", "Backward": "write", "ZeroGrad": "write", "CreateOptimizer": "write",
    "OptimizerStep": "write", "GetOptimizerState": "read", "ConfigureTraining": "write",
    "PullModel": "read", "PushGrads": "write", "ApplyBatch": "write", "WatchModel": "read",
    "CreateCheckpoint": "admin", "ListCheckpoints": "read", "RestoreCheckpoint": "admin",
    "DeleteCheckpoint": "admin", "ExportCheckpoint": "read", "CompactModel": "admin",
    "GetTransportInfo": "read", "PullState": "read", "PushState": "write",
    "GetTensorInline": "read",
}
_IDEMPOTENT_BEFORE = {"ListModels", "DescribeModel", "ListParameters", "GetTensor", "CheckShared",
                      "Probe", "GetOptimizerState", "PullModel", "SetSlice", "StreamSetSlice",
                      "ApplyInit", "ApplyBatch", "RestoreCheckpoint", "ListCheckpoints",
                      "ExportCheckpoint", "SetTrainingMode"}
_WRITERS_BEFORE = {"SetSlice", "StreamSetSlice", "ApplyInit", "ApplyBatch", "RestoreCheckpoint",
                   "PushState"}


def test_every_rpc_declares_a_role():
    assert set(rpcs.FACTS) == {m.name for m in rpcs.SERVICE.methods}
    assert not [n for n, f in rpcs.FACTS.items() if f.role not in rpcs.ROLES]


def test_auth_roles_derive_from_the_proto():
    assert auth.METHOD_ROLES == _ROLES_BEFORE


def test_retry_policy_and_writer_header_derive_from_the_proto():
    assert set(client._IDEMPOTENT) == _IDEMPOTENT_BEFORE
    assert client._WRITER_METHODS == _WRITERS_BEFORE
    # Forward updates buffers in training mode: never retried.
    assert "Forward" not in client._IDEMPOTENT


def test_raw_framing_and_admission_derive_from_the_proto():
    assert set(rpcs.names(raw_response=True)) == {"GetTensor", "PullState", "GetTensorInline",
                                                  "WatchModel"}
    assert {n: f.raw_request_field for n, f in rpcs.FACTS.items() if f.raw_request_field} == {
        "StreamSetSlice": 2, "PushState": 2}
    assert admission.method_class("WatchModel", request_streaming=False,
                                  response_streaming=True) == admission.WATCH
    assert admission.method_class("PushGrads", request_streaming=True,
                                  response_streaming=False) == admission.ROUND
    assert admission.method_class("GetTensor", request_streaming=False,
                                  response_streaming=True) == admission.TRANSFER
