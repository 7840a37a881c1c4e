"""Bearer-token authentication with three roles: read < write < admin.

The auth file has one `<role> <token>` per line (blank lines and `#` comments ignored). Every
ParameterService RPC needs the role named in `METHOD_ROLES`, one explicit table: a test checks
that every RPC of the service descriptor has an entry, so a new RPC cannot slip in unguarded,
and an RPC missing from it anyway needs admin (fail closed). grpc.health.v1 and server reflection
stay open (load balancers and grpcurl must work without a token). Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from paramhub.common import rpcs
from paramhub.errors import AuthError, PermissionDeniedError
from paramhub.common import pb

log = logging.getLogger(__name__)

READ, WRITE, ADMIN = "read", "write", "admin"
#: Roles from lowest to highest; each includes the rights of those before it.
ROLES = (READ, WRITE, ADMIN)
_LEVEL = {r: i for i, r in enumerate(ROLES)}

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterService"].full_name

#: The role each ParameterService RPC needs, from its `(paramhub.v1.rpc)` option in the proto.
#: Reads (including Forward, which computes on a snapshot, and probes) need read (a Forward that
#: would update buffers in training mode is refused to a read token by the core, see
#: ServedModel.forward); anything that changes tensor values or module state needs write;
#: creating and deleting models and checkpoints, restoring one, and compaction need admin.
METHOD_ROLES: dict[str, str] = {name: f.role for name, f in rpcs.FACTS.items()}

#: Tokens shorter than this are rejected when the file is read (guessable).
MIN_TOKEN_LENGTH = 16


class AuthFileError(ValueError):
    """The auth file is unreadable or malformed (the message never contains a token)."""


#: The cluster's service (cluster/service.py): every RPC of it reads, but the routed writes.
CLUSTER_SERVICE = "paramhub.v1.ClusterService"
CLUSTER_WRITES = frozenset({"StageShard", "CommitStagedWrite", "CommitStagedState"})


def required_role(full_method: str) -> str | None:
    """The role an RPC needs: None for open services (health, reflection), admin for any
    ParameterService RPC missing from METHOD_ROLES."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    if service == CLUSTER_SERVICE:  # cluster layout and shard reads: read-only
        return WRITE if method in CLUSTER_WRITES else READ
    if service != SERVICE:
        return None
    return METHOD_ROLES.get(method, ADMIN)


@dataclass(frozen=True)
class Principal:
    """Who made a call: the role of the matching token and a non-secret label for logs."""

    role: str
    label: str


class Authenticator:
    """Checks `authorization: Bearer <token>` metadata against the tokens of an auth file."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        if not entries:
            raise AuthFileError("the auth file has no tokens")
        # (token bytes, role, label): the label is the line number, safe to log.
        self._entries = [(tok.encode(), role, label) for role, tok, label in
                         ((r, t, f"token#{i + 1}") for i, (r, t) in enumerate(entries))]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Authenticator:
        """Reads an auth file; AuthFileError names the line, never the token."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
            mode = p.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise AuthFileError(f"cannot read auth file {str(p)!r}: {e.__class__.__name__}"
                                ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("auth file %s is readable by group or others; chmod 600 it", p)
        entries: list[tuple[str, str]] = []
        seen: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise AuthFileError(f"{p}:{lineno}: expected '<role> <token>'")
            role, token = parts
            if role not in _LEVEL:
                raise AuthFileError(f"{p}:{lineno}: unknown role {role[:20]!r}; one of "
                                    f"{', '.join(ROLES)}")
            if len(token) < MIN_TOKEN_LENGTH:
                raise AuthFileError(f"{p}:{lineno}: token shorter than {MIN_TOKEN_LENGTH} "
                                    "characters")
            if token in seen and seen[token] != role:
                raise AuthFileError(f"{p}:{lineno}: the same token is listed with two roles")
            seen[token] = role
            entries.append((role, token))
        return cls(entries)

    def authenticate(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Principal:
        """The principal of a call's metadata; AuthError (UNAUTHENTICATED) if there is no
        bearer token or it matches none."""
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        if header is None:
            raise AuthError("this server requires a bearer token (authorization metadata)",
                            reason="TOKEN_MISSING")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("authorization metadata must be 'Bearer <token>'",
                            reason="BAD_AUTHORIZATION")
        given = token.strip().encode("utf-8", "surrogateescape")
        match: Principal | None = None
        # Compare against every entry, always, so timing reveals neither the token nor its
        # position in the file.
        for tok, role, label in self._entries:
            if hmac.compare_digest(given, tok) and match is None:
                match = Principal(role, label)
        if match is None:
            raise AuthError("the bearer token is not valid", reason="TOKEN_INVALID")
        return match

    @staticmethod
    def authorize(principal: Principal, full_method: str) -> None:
        """PermissionDeniedError unless the principal's role is enough for the RPC."""
        needed = required_role(full_method)
        if needed is not None and _LEVEL[principal.role] < _LEVEL[needed]:
            method = full_method.rpartition("/")[2]
            raise PermissionDeniedError(
                f"{method} needs the {needed} role; this token has {principal.role}",
                reason="ROLE_TOO_LOW",
                metadata={"method": method, "needed": needed, "role": principal.role})
