"""The network layer's exceptions.

Tree::

    NetworkError
    └── NodeFailed      one attempt of a job failed on its node (refused, errored, went
                        away, timed out, or its client stopped reading); the scheduler
                        decides from it whether to fail over, whom to blame, and the
                        job's outcome. It never leaves the scheduler: clients see the
                        domain errors of ``routecat.errors``.
"""

from __future__ import annotations

from routecat.network.jobs import Outcome


class NetworkError(Exception):
    """Base of the network layer's exceptions."""


class NodeFailed(NetworkError):
    def __init__(
        self, reason: str, retryable: bool, blame: bool = True, outcome: Outcome = "node_failed"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.blame = blame
        self.outcome = outcome
