"""The ``routecat`` command: ``serve`` and the operator's commands.

Commands that need only the database work offline on the SQLite file; every
setting comes from flags > ``ROUTECAT_*`` environment > TOML file, and secrets
never from a flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from ledger.store import Connection
from routecat.clock import Clock
from routecat.config import Config, load_config
from routecat.db import nodes as nodes_db
from routecat.db import payouts as payouts_db
from routecat.db.cluster import bump_epoch
from routecat.db.keys import ApiKey
from routecat.db.schema import is_postgres
from routecat.errors import ConfigError
from routecat.logs import setup_logging
from routecat.money import keys as keys_mod
from routecat.money.settlement import credit
from routecat.network.registry import BANS_EPOCH

HELP = {
    "host": "interface to bind (default 127.0.0.1)",
    "port": "TCP port (default 8080; 0 picks a free one)",
    "database": "SQLite file (default ./routecat.db)",
    "log_level": "DEBUG, INFO, WARNING, ERROR (default INFO)",
    "log_format": "text or json (default text)",
    "max_body_bytes": "largest request body accepted (default 8 MiB)",
    "trusted_proxies": "comma-separated proxy addresses/networks allowed to set X-Forwarded-For",
    "btc_usd": "pin the BTC/USD rate instead of live sources",
    "lightning": "Lightning backend: dev (default), lnbits, phoenixd, lnd",
    "catalog": "TOML price catalog (USD per 1M tokens per model)",
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for field in attrs.fields(Config):
        if field.metadata.get("secret"):
            continue
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=field.name,
            default=argparse.SUPPRESS,
            metavar=field.name.upper(),
            help=HELP.get(field.name, f"(default {field.default!r})"),
        )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="TOML configuration file (also ROUTECAT_CONFIG)",
    )
    _add_setting_flags(common)
    parser = argparse.ArgumentParser(
        prog="routecat",
        description="RouteCat: an OpenAI-compatible inference gateway paid per token in sats.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "serve",
        parents=[common],
        help="run the gateway",
        description="Run the gateway: HTTP API, web pages and the node websocket on one port.",
    )
    for name, help_text, actions in COMMAND_TREE:
        group = sub.add_parser(name, help=help_text)
        group_sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, action_help, positionals in actions:
            leaf = group_sub.add_parser(action, parents=[common], help=action_help)
            for positional in positionals:
                if positional.startswith("--"):
                    leaf.add_argument(positional, type=int, required=True)
                else:
                    leaf.add_argument(positional)
    return parser


COMMAND_TREE: list[tuple[str, str, list[tuple[str, str, list[str]]]]] = [
    (
        "keys",
        "list, revoke or rotate API keys",
        [
            ("list", "every key: prefix, name, created, revoked", []),
            ("revoke", "revoke a key by its prefix", ["prefix"]),
            ("rotate", "new secret, same account and balance", ["prefix"]),
            ("credit", "credit a key from operator equity (audited)", ["prefix", "--sats"]),
        ],
    ),
    (
        "wallet",
        "the dev wallet",
        [("pay", "pay an invoice this gateway issued (dev wallet)", ["invoice"])],
    ),
    (
        "lightning",
        "Lightning reconciliation",
        [("reconcile", "ask the backend about every pending top-up and payout now", [])],
    ),
    ("payouts", "provider payouts", [("list", "recent payouts and their state", [])]),
    (
        "ledger",
        "the double-entry ledger",
        [
            ("check", "prove balances equal postings and all accounts sum to zero", []),
            (
                "history",
                "postings of one account (user:ID, provider:NODE, operator:fee, ...)",
                ["account"],
            ),
            ("accounts", "every account with its balance and reservations", []),
        ],
    ),
    (
        "db",
        "database maintenance",
        [
            ("backup", "online backup of the SQLite file", ["target"]),
            ("migrate", "create or update the tables (safe with replicas starting at once)", []),
            (
                "copy",
                "copy a SQLite install into an empty database (e.g. PostgreSQL), then check both",
                ["source", "target"],
            ),
        ],
    ),
    (
        "nodes",
        "provider nodes",
        [
            ("list", "live nodes: models, load, speed, health (needs the running gateway)", []),
            ("ban", "ban a node id (and disconnect it if online)", ["node_id", "reason"]),
        ],
    ),
]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in attrs.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in names}


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_serve(config: Config, _args: argparse.Namespace) -> int:
    from routecat.server import run

    return run(config)


def _forget_keys(config: Config) -> None:
    """Make a running gateway drop its cached keys (revoke and rotate act at once)."""
    from routecat.api.admin import admin_call

    with contextlib.suppress(LookupError):
        admin_call(config, "POST", "/keys/invalidate")


def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    from routecat.server import open_store

    store = open_store(config)
    try:
        if args.action == "list":
            for k in keys_mod.list_keys(store):
                state = "revoked" if k.revoked else "active"
                print(f"{k.prefix}...  {state:8} {k.created_at}  {k.name}")
        elif args.action == "revoke":
            record = keys_mod.revoke_key(store, args.prefix)
            _forget_keys(config)
            print(f"revoked {record.prefix}... ({record.name})")
        elif args.action == "rotate":
            record, key = keys_mod.rotate_key(store, args.prefix)
            _forget_keys(config)
            print(f"new key for {record.name} (shown once): {key}")
        elif args.action == "credit":
            if args.sats <= 0:
                raise LookupError("--sats must be a positive number of sats")

            def give(db: Any) -> ApiKey:
                record = keys_mod.find_by_prefix(db, args.prefix)
                idem = "credit:" + secrets.token_hex(12)
                credit(db, record.id, args.sats * 1000, f"operator credit to {record.prefix}", idem)
                return record

            record = store.write_sync(give)
            print(f"credited {args.sats} sats to {record.prefix}... ({record.name})")
    finally:
        store.close()
    return 0


def cmd_wallet(config: Config, args: argparse.Namespace) -> int:
    from routecat.api.admin import admin_call

    if args.command == "wallet":
        data = admin_call(config, "POST", "/wallet/pay", {"invoice": args.invoice})
        print(f"paid {data['payment_hash']} (top-up {data['topup']})")
    else:
        data = admin_call(config, "POST", "/lightning/reconcile")
        print(f"reconciled: {data['topups_credited']} top-ups credited")
    return 0


def cmd_payouts(config: Config, args: argparse.Namespace) -> int:
    from routecat.server import open_store

    store = open_store(config)
    try:
        found = store.read_sync(payouts_db.recent)
        holds = store.read_sync(payouts_db.holds)
    finally:
        store.close()
    for p in found:
        print(
            f"#{p.id:<5} {p.state:8} {p.amount_msat // 1000:>10} sats"
            f"  fee {p.fee_msat} msat  {p.node_id} -> {p.address}  {p.reason}"
        )
    if not found:
        print("no payouts yet")
    if holds:
        print("held (not sent; retried automatically):")
    for h in holds:
        retry = datetime.fromtimestamp(h.next_attempt_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"  {h.node_id}: {h.reason} ({h.failures} failures, next try {retry})")
    return 0


def cmd_ledger(config: Config, args: argparse.Namespace) -> int:
    from ledger import book
    from routecat.server import open_store

    store = open_store(config)
    try:
        if args.action == "check":
            result = store.read_sync(book.check)
            print(
                f"{result.accounts} accounts, {result.transactions} transactions,"
                f" {result.postings} postings"
            )
            print(f"sum of all postings: {result.total_msat} msat")
            for problem in result.problems():
                print(f"BROKEN {problem}")
            print("ledger OK" if result.ok else "ledger BROKEN")
            return 0 if result.ok else 1
        if args.action == "accounts":
            for row in store.read_sync(book.accounts):
                print(
                    f"{row['id']:40} {row['balance_msat']:>16} msat  reserved {row['reserved_msat']}"
                )
            return 0
        entries = store.read_sync(lambda db: book.history(db, args.account))
        if not entries:
            raise LookupError(f"no postings for account {args.account}")
        for e in entries:
            print(f"{e['created_at']}  {e['amount_msat']:>14} msat  {e['kind']:8} {e['memo']}")
    finally:
        store.close()
    return 0


def cmd_db(config: Config, args: argparse.Namespace) -> int:
    from ledger import book
    from routecat.db import copy as copy_db
    from routecat.db.schema import is_postgres, open_store, redact
    from routecat.server import open_store as open_configured

    if args.action == "copy":
        if is_postgres(args.source):
            raise LookupError("the source of a copy is a SQLite install (sqlite:///path)")
        source, target = open_store(args.source), open_store(args.target)
        try:
            copied = copy_db.copy(source, target, postgres_target=is_postgres(args.target))
            for table, count in copied.items():
                print(f"{table:20} {count:>10} rows")
            ok = True
            for name, store in (("source", source), ("target", target)):
                result = store.read_sync(book.check)
                print(
                    f"ledger check of the {name} ({redact(store.path)}): "
                    + ("OK" if result.ok else "BROKEN")
                )
                for problem in result.problems():
                    print(f"BROKEN {problem}")
                ok = ok and result.ok
        finally:
            source.close()
            target.close()
        return 0 if ok else 1
    store = open_configured(config)
    try:
        if args.action == "migrate":
            print(f"{redact(config.database)}: tables up to date")
        else:
            if is_postgres(config.database):
                raise LookupError(
                    "back up PostgreSQL with its own tools (pg_dump, or base backups and WAL)"
                )
            store.backup(args.target)
            print(f"backed up {config.database} to {args.target}")
    finally:
        store.close()
    return 0


def cmd_nodes(config: Config, args: argparse.Namespace) -> int:
    from routecat.api.admin import admin_call
    from routecat.server import open_store

    if args.action == "list" and is_postgres(config.database):
        return _list_cluster_nodes(config)
    if args.action == "list":
        data = admin_call(config, "GET", "/nodes")
        print(f"{data['nodes_online']} nodes online, {data['in_flight']} jobs in flight")
        for n in data["nodes"]:
            state = "draining" if n["draining"] else ("cooling" if n["cooling_down_s"] else "ok")
            print(
                f"{n['id']:24} {n.get('kind', 'native'):6} {state:8}"
                f" load {n['in_flight']}/{n['capacity']}"
                f"  ttft {n['ttft_ms']} ms  {n['tokens_per_s']} tok/s"
                f"  seen {n['last_seen_s']}s ago  agent {n.get('agent_version', '')}"
                f"  models: {', '.join(n['models'])}"
            )
        return 0
    store = open_store(config)
    try:
        at = Clock().now_iso()

        def ban(db: Connection) -> bool:
            banned = nodes_db.ban_node(db, args.node_id, args.reason, at)
            bump_epoch(db, BANS_EPOCH)  # every replica closes the node if it holds it
            return banned

        if not store.write_sync(ban):
            raise LookupError(f"no node {args.node_id} has ever connected")
    finally:
        store.close()
    # Offline or not connected: the ban holds at its next hello.
    with contextlib.suppress(LookupError):
        admin_call(config, "POST", f"/nodes/{args.node_id}/disconnect", {"reason": "banned"})
    print(f"banned {args.node_id}: {args.reason}")
    return 0


def _list_cluster_nodes(config: Config) -> int:
    """Every replica's nodes, from the node directory (PostgreSQL: no single gateway
    holds them all)."""
    import time

    from routecat.db import cluster
    from routecat.server import open_store

    store = open_store(config)
    try:
        since = time.time() - config.replica_liveness
        replicas = store.read_sync(lambda db: cluster.replicas(db, since))
        entries = store.read_sync(lambda db: cluster.directory(db, since))
    finally:
        store.close()
    live = {r.id: r.url for r in replicas}
    entries = [e for e in entries if e.replica_id in live]
    print(
        f"{len(entries)} nodes online on {len(live)} replicas,"
        f" {sum(e.in_flight for e in entries)} jobs in flight"
    )
    for e in entries:
        print(
            f"{e.node_id:24} load {e.in_flight}/{e.capacity}  replica {e.replica_id}"
            f" ({live[e.replica_id]})  models: {', '.join(e.models)}"
        )
    return 0


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "keys": cmd_keys,
    "db": cmd_db,
    "nodes": cmd_nodes,
    "ledger": cmd_ledger,
    "wallet": cmd_wallet,
    "lightning": cmd_wallet,
    "payouts": cmd_payouts,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(flags=_settings(args), config_file=getattr(args, "config", None))
    except ConfigError as exc:
        print(f"routecat: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        return COMMANDS[args.command](config, args)
    except LookupError as exc:
        logging.getLogger("routecat").error("%s", exc.args[0] if exc.args else exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
