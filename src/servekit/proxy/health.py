"""A node's health: active checks (healthy after 2 successes, unhealthy after 3 failures) and a circuit
breaker over its requests (closed -> open after N consecutive failures -> half-open after a cooldown,
where one trial request decides). Pure state: the caller passes the time, so tests need no clock."""

from __future__ import annotations

import enum
from dataclasses import dataclass

HEALTHY_AFTER = 2
UNHEALTHY_AFTER = 3


class Circuit(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class NodeHealth:
    failures_to_open: int = 3
    cooldown_s: float = 10.0
    healthy: bool = False
    circuit: Circuit = Circuit.CLOSED
    check_successes: int = 0  # consecutive
    check_failures: int = 0  # consecutive
    request_failures: int = 0  # consecutive
    opened_at: float = 0.0
    trial_in_flight: bool = False

    # ------------------------------------------------------------------ active checks
    def check_succeeded(self) -> bool:
        """Record a passed check; True when it made the node healthy."""
        self.check_failures = 0
        self.check_successes += 1
        if not self.healthy and self.check_successes >= HEALTHY_AFTER:
            self.healthy = True
            return True
        return False

    def check_failed(self) -> bool:
        """Record a failed check; True when it made the node unhealthy."""
        self.check_successes = 0
        self.check_failures += 1
        if self.healthy and self.check_failures >= UNHEALTHY_AFTER:
            self.healthy = False
            return True
        return False

    # ------------------------------------------------------------------ circuit breaker
    def admits(self, now: float) -> bool:
        """Whether a request may go to this node now (it does not reserve the half-open trial)."""
        if not self.healthy:
            return False
        if self.circuit is Circuit.OPEN:
            return now - self.opened_at >= self.cooldown_s
        if self.circuit is Circuit.HALF_OPEN:
            return not self.trial_in_flight
        return True

    def request_started(self, now: float) -> None:
        if self.circuit is Circuit.OPEN and now - self.opened_at >= self.cooldown_s:
            self.circuit = Circuit.HALF_OPEN
        if self.circuit is Circuit.HALF_OPEN:
            self.trial_in_flight = True

    def request_succeeded(self) -> None:
        self.request_failures = 0
        self.trial_in_flight = False
        self.circuit = Circuit.CLOSED

    def request_failed(self, now: float) -> None:
        self.request_failures += 1
        self.trial_in_flight = False
        if self.circuit is Circuit.HALF_OPEN or self.request_failures >= self.failures_to_open:
            self.circuit = Circuit.OPEN
            self.opened_at = now

    def request_ended(self) -> None:
        """A request that neither passed nor failed (the client left): frees a half-open trial."""
        self.trial_in_flight = False
