"""The agent's exceptions.

Tree::

    OwlrunError
    ├── EngineError      the local engine failed a job (``retryable`` says if another node may try)
    ├── RefusedError     the gateway refused this node (wrong secret, banned, bad version)
    ├── GatewayLost      the gateway went silent: no frame, no pong (also a ``ConnectionError``)
    ├── ProtocolError    a frame that is not a valid message of this protocol version (also a
    │                    ``ValueError``; ``owlrun.protocol`` raises it, the gateway too)
    └── LineTooLong      a streamed body's line past its bound (``owlrun.lines``; also a
                         ``ValueError``)
"""

from __future__ import annotations


class OwlrunError(Exception):
    pass


class EngineError(OwlrunError):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class RefusedError(OwlrunError):
    def __init__(self, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class GatewayLost(OwlrunError, ConnectionError):
    """The gateway said nothing (protocol 4: not even a pong) for too long: the path
    to it is taken for dead, so the connection is dropped without a close handshake."""


class ProtocolError(OwlrunError, ValueError):
    """A frame that is not a valid message of this protocol version."""


class LineTooLong(OwlrunError, ValueError):
    """A line of a streamed body (an engine's answer, a forwarded job) past its bound."""
