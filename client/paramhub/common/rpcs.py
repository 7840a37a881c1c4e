"""Per-RPC facts, read from the `(paramhub.v1.rpc)` method options declared on each RPC in
protos/paramhub/v1/parameter_service.proto: the role it needs, whether it is safe to retry,
whether it records its writer, its raw framing, how it waits. The auth table, the retry policy,
the writer header, the raw (de)serializers and the admission classes are all derived from
`FACTS`; none of them lists RPC names by hand."""

from __future__ import annotations

from dataclasses import dataclass

from paramhub.v1 import options_pb2
from paramhub.v1 import parameter_service_pb2 as pb

__all__ = ["RpcFacts", "FACTS", "SERVICE", "ROLES", "names"]

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterService"]
#: Role names, lowest first (each includes the rights of those before it).
ROLES = ("read", "write", "admin")
_ROLE = {options_pb2.ROLE_READ: "read", options_pb2.ROLE_WRITE: "write",
         options_pb2.ROLE_ADMIN: "admin"}
_WAIT = {options_pb2.WAIT_UNSPECIFIED: "", options_pb2.WAIT_WATCH: "watch",
         options_pb2.WAIT_ROUND: "round"}


@dataclass(frozen=True)
class RpcFacts:
    """What both sides know about one ParameterService RPC (see options.proto's RpcFacts)."""

    name: str
    #: "read", "write" or "admin"; "" when the RPC declares none (tests refuse that).
    role: str
    idempotent: bool
    writes: bool
    raw_response: bool
    #: Field number of the request's bytes field read as raw frames; 0 for none.
    raw_request_field: int
    #: "", "watch" or "round".
    wait: str
    client_streaming: bool
    server_streaming: bool


def _facts(method: object) -> RpcFacts:
    opts = method.GetOptions().Extensions[options_pb2.rpc]  # type: ignore[attr-defined]
    return RpcFacts(name=method.name, role=_ROLE.get(opts.role, ""),  # type: ignore[attr-defined]
                    idempotent=opts.idempotent, writes=opts.writes,
                    raw_response=opts.raw_response, raw_request_field=opts.raw_request_field,
                    wait=_WAIT[opts.wait],
                    client_streaming=method.client_streaming,  # type: ignore[attr-defined]
                    server_streaming=method.server_streaming)  # type: ignore[attr-defined]


#: RPC name -> its facts, in the service's declaration order.
FACTS: dict[str, RpcFacts] = {m.name: _facts(m) for m in SERVICE.methods}


def names(**where: object) -> tuple[str, ...]:
    """The RPCs whose facts have the given values, e.g. names(idempotent=True)."""
    return tuple(n for n, f in FACTS.items()
                 if all(getattr(f, k) == v for k, v in where.items()))
