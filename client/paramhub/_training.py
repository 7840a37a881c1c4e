"""Training modes and push outcomes: Python names <-> the wire enums, and `PushResult`."""

from __future__ import annotations

from dataclasses import dataclass

from paramhub.common import pb

__all__ = ["MODES", "OUTCOMES", "POLICIES", "PushResult"]

MODES = {"async": pb.TRAINING_MODE_ASYNC, "sync": pb.TRAINING_MODE_SYNC,
         "bounded_staleness": pb.TRAINING_MODE_BOUNDED_STALENESS}
POLICIES = {"reject": pb.STALE_POLICY_REJECT, "scale": pb.STALE_POLICY_SCALE}
OUTCOMES = {pb.PUSH_OUTCOME_APPLIED: "applied", pb.PUSH_OUTCOME_SCALED: "scaled",
            pb.PUSH_OUTCOME_REJECTED: "rejected", pb.PUSH_OUTCOME_QUEUED: "queued"}


@dataclass(frozen=True)
class PushResult:
    """What the server did with pushed gradients.

    Attributes:
        outcome: "applied", "scaled" (bounded staleness, multiplied by `scale`), "rejected"
            (too stale, or computed before the last sync step: pull and recompute) or "queued"
            (sync: counted, but the round had not stepped when the call's deadline came).
        staleness: optimizer steps taken since the version the gradients were computed at.
        scale: the factor applied to the gradients (1.0 unless scaled).
        model_version: the model's version after the push; pull again to train on it.
        steps: optimizer steps taken so far.
    """

    outcome: str
    staleness: int
    scale: float
    model_version: int
    steps: int

    @property
    def applied(self) -> bool:
        """Whether the gradients went into a step (applied or scaled)."""
        return self.outcome in ("applied", "scaled")
