"""The node's identity: an id and a secret generated on first run, kept in a 0600 file.

Invariant: the secret is created once with ``secrets`` and only ever leaves this
machine in the ``X-Owlrun-Secret`` header of the websocket upgrade; the gateway keeps
only its hash. Losing the file means a new node id (earnings stay with the old one).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import attrs


@attrs.frozen
class Identity:
    node_id: str
    secret: str = attrs.field(repr=False)
    settings: dict[str, Any] = attrs.Factory(dict)


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "owlrun" / "node.json"


def load_or_create(path: Path) -> Identity:
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)
        return Identity(
            node_id=str(data["node_id"]),
            secret=str(data["secret"]),
            settings={k: v for k, v in data.items() if k not in ("node_id", "secret")},
        )
    identity = Identity(node_id="node_" + secrets.token_hex(8), secret=secrets.token_urlsafe(32))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"node_id": identity.node_id, "secret": identity.secret}, f, indent=2)
    return identity
