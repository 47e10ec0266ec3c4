"""Lightning Address (LUD-16) / LNURL-pay (LUD-06) resolution, refusing to be a proxy
into private networks.

Invariants: every host (the address's domain and the callback's) is resolved first,
and a private, loopback, link-local, multicast or reserved address is refused unless
the operator allows them; the connection then goes to the IP that was checked (no
second DNS answer can swap it). Every call has a timeout and a response size limit.
The invoice returned must pass ``check_invoice`` (amount equal to the amount asked,
network, expiry, signature) and the amount must lie within ``minSendable..maxSendable``.
A description-hash mismatch is logged, not blocking (LUD-06 dropped the check).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import urllib.parse
from typing import Any

import attrs
import httpx
import trio

from routecat.money.lightning.backend import check_invoice
from routecat.money.lightning.errors import InvoiceRejected, LnurlError, map_exceptions

log = logging.getLogger("routecat.money.lightning.lnurl")

USER = re.compile(r"[a-z0-9._+-]{1,64}")
LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_BYTES = 64 * 1024
TIMEOUT = 10.0


def parse_address(address: str) -> tuple[str, str]:
    """``(user, domain)`` of a Lightning Address (LUD-16: ``user@domain``), lowercased.

    Strict on purpose: a domain is two or more DNS labels, not an IP literal, with no
    port, path or credentials. Raises ``LnurlError`` saying what is wrong."""
    if not isinstance(address, str) or address.count("@") != 1 or len(address) > 320:
        raise LnurlError("a Lightning Address is user@domain")
    user, domain = address.lower().split("@")
    if not USER.fullmatch(user):
        raise LnurlError("the user part may hold only a-z, 0-9, '.', '_', '+' and '-'")
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2 or not all(LABEL.fullmatch(x) for x in labels):
        raise LnurlError("the domain must be a DNS name like example.com (no port, no IP)")
    if labels[-1].isdigit():
        raise LnurlError("the domain must be a DNS name, not an IP address")
    return user, domain


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a Lightning Address, or None if it is one."""
    try:
        parse_address(address)
    except LnurlError as exc:
        return str(exc)
    return None


@attrs.frozen
class PayRequest:
    callback: str
    min_sendable: int
    max_sendable: int
    metadata: str


def _check_ip(ip: str, allow_private: bool) -> None:
    address = ipaddress.ip_address(ip)
    if allow_private:
        return
    if (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        raise LnurlError(f"refusing to connect to the non-public address {ip}")


async def _resolve(host: str, port: int, allow_private: bool) -> str:
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        raise LnurlError(f"cannot resolve {host}: {exc}") from None
    ips = sorted({str(info[4][0]) for info in infos})
    if not ips:
        raise LnurlError(f"{host} has no address")
    for ip in ips:
        _check_ip(ip, allow_private)  # every answer must be public, not just one
    return ips[0]


@attrs.define(eq=False)
class Resolver:
    client: httpx.AsyncClient
    allow_private: bool = False
    # The operator's own base URL for every address (e.g. a local LNbits): trusted, so
    # exempt from the public-address rule; callbacks it returns are still checked.
    base_url_override: str = ""
    timeout: float = TIMEOUT

    async def _get_json(self, url: str, *, trusted: bool = False) -> Any:
        """GET a JSON document; ``trusted`` only for the operator's own override URL."""
        if len(url) > 2048 or any(ord(c) < 33 or ord(c) == 127 for c in url):
            raise LnurlError("malformed URL (too long, or spaces or control characters)")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise LnurlError(f"malformed URL: {exc}") from None
        if parts.scheme not in ("https", "http"):
            raise LnurlError(f"unsupported URL scheme {parts.scheme!r}")
        host = parts.hostname or ""
        if not host:
            raise LnurlError("the URL names no host")
        ip = await _resolve(host, port, self.allow_private or trusted)
        if parts.scheme == "http" and not (self.allow_private or trusted):
            raise LnurlError("LNURL requires https")
        netloc = f"[{ip}]" if ":" in ip else ip
        target = urllib.parse.urlunsplit(
            (parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query, "")
        )
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        authority = name if parts.port is None else f"{name}:{port}"  # never userinfo
        headers = {"Host": authority, "Accept": "application/json"}
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            with trio.fail_after(self.timeout), map_exceptions(host, LnurlError):
                async with self.client.stream(
                    "GET", target, headers=headers, extensions=extensions
                ) as response:
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BYTES:
                            raise LnurlError("LNURL response too large")
        except trio.TooSlowError:
            raise LnurlError(f"{host} did not answer within {self.timeout:g}s") from None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise LnurlError(f"{host} did not answer JSON (HTTP {response.status_code})") from None
        if isinstance(data, dict) and str(data.get("status", "")).upper() == "ERROR":
            raise LnurlError(f"{host} answered an error: {str(data.get('reason', ''))[:200]}")
        if response.status_code != 200:
            raise LnurlError(f"{host} answered HTTP {response.status_code}")
        return data

    def _is_override(self, url: str) -> bool:
        """A callback on the operator's own override host is as trusted as the host."""
        if not self.base_url_override:
            return False
        ours = urllib.parse.urlsplit(self.base_url_override)
        try:
            theirs = urllib.parse.urlsplit(url)
        except ValueError:  # a malformed callback: refused as such by ``_get_json``
            return False
        return (ours.scheme, ours.netloc) == (theirs.scheme, theirs.netloc)

    def address_url(self, address: str) -> str:
        user, domain = parse_address(address.strip())
        base = self.base_url_override.rstrip("/") or f"https://{domain}"
        return f"{base}/.well-known/lnurlp/{user}"

    async def pay_request(self, address: str) -> PayRequest:
        data = await self._get_json(self.address_url(address), trusted=bool(self.base_url_override))
        if not isinstance(data, dict) or data.get("tag") != "payRequest":
            raise LnurlError("not an LNURL-pay response (tag != payRequest)")
        callback, low, high = data.get("callback"), data.get("minSendable"), data.get("maxSendable")
        metadata = data.get("metadata", "")
        if (
            not isinstance(callback, str)
            or not isinstance(metadata, str)
            or not isinstance(low, int)
            or not isinstance(high, int)
            or isinstance(low, bool)
            or isinstance(high, bool)
        ):
            raise LnurlError("malformed LNURL-pay response")
        request = PayRequest(callback, low, high, metadata)
        if request.min_sendable < 1 or request.max_sendable < request.min_sendable:
            raise LnurlError("nonsensical minSendable/maxSendable")
        return request

    async def fetch_invoice(self, address: str, amount_msat: int, network: str) -> str:
        """A checked invoice for exactly ``amount_msat`` to ``address``."""
        request = await self.pay_request(address)
        if not request.min_sendable <= amount_msat <= request.max_sendable:
            raise LnurlError(
                f"{amount_msat} msat is outside {request.min_sendable}..{request.max_sendable}"
            )
        sep = "&" if "?" in request.callback else "?"
        data = await self._get_json(
            f"{request.callback}{sep}amount={amount_msat}",
            trusted=self._is_override(request.callback),
        )
        pr = data.get("pr") if isinstance(data, dict) else None
        if not isinstance(pr, str):
            raise LnurlError("the callback returned no invoice")
        try:
            decoded = check_invoice(pr, amount_msat, network)
        except InvoiceRejected as exc:
            raise LnurlError(f"unacceptable invoice: {exc}") from None
        expected = hashlib.sha256(request.metadata.encode()).hexdigest()
        if decoded.description_hash and decoded.description_hash != expected:
            log.warning("invoice from %s: description hash does not match the metadata", address)
        return pr
