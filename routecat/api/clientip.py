"""The client's IP address: from the socket, unless the peer is a trusted proxy.

Invariant: a header can change the client IP only when the TCP peer is one of the
operator's configured trusted proxies; a spoofed ``X-Forwarded-For`` from anyone
else is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Sequence[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(s, strict=False) for s in specs)


def _trusted(addr: str, proxies: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_ip(peer: str | None, forwarded_for: str | None, proxies: Sequence[IPNetwork]) -> str:
    """Walk ``X-Forwarded-For`` from the right while the hops are trusted proxies."""
    peer = peer or "unknown"
    if not proxies or not forwarded_for or not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer
