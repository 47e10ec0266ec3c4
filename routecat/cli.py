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
from pathlib import Path
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
    "host": "interface to bind (default 127.0.0.1; 0.0.0.0 for every interface)",
    "port": "TCP port (default 8080; 0 picks a free one and logs it)",
    "database": "a SQLite file (default ./routecat.db), or postgresql://user@host/db for replicas",
    "log_level": "how much to log: DEBUG, INFO, WARNING or ERROR (default INFO)",
    "log_format": "text for people or json for one object per line (default text)",
    "max_body_bytes": "largest request body accepted; larger get 413 (default 8 MiB)",
    "trusted_proxies": "comma-separated proxy addresses or networks allowed to set"
    " X-Forwarded-For (default none)",
    "public_url": "the gateway's public base URL, for web pages and webhooks (default:"
    " from each request)",
    "rate_limit_per_minute": "completions one key may start per minute (default 60)",
    "register_limit_per_hour": "key registrations per client IP per hour (default 5)",
    "read_limit_per_minute": "public read requests per client IP per minute (default 600)",
    "heartbeat_interval": "seconds between a node's heartbeats (default 10; 0.1 to 3600)",
    "heartbeat_misses": "heartbeats a node may miss before it is dropped (default 3)",
    "queue_timeout": "seconds a request may wait for a free node before 503 (default 30)",
    "queue_max": "requests that may wait for a node at once; more get 503 (default 1000)",
    "first_token_timeout": "seconds a node may take to its first token before the job"
    " moves on (default 120)",
    "inter_token_timeout": "seconds of silence between tokens that end a stream (default 30)",
    "keepalive_interval": "seconds between ': ping' lines while a stream waits (default 15)",
    "drain_timeout": "seconds in-flight jobs may take to finish at shutdown (default 30)",
    "max_attempts": "nodes tried for one request before its first token (default 3)",
    "max_frame_bytes": "largest websocket frame accepted from a node (default 16 MiB)",
    "default_max_tokens": "completion cap when a request sets no max_tokens (default 4096)",
    "free_daily_requests": "free requests per key per UTC day (default 10; 0: none)",
    "free_max_tokens": "largest max_tokens a free request may ask (default 1024)",
    "free_daily_budget_sats": "the day's subsidy for all free requests, in sats (default 10000)",
    "probation_days": "days free-job earnings are held before payout (default 7)",
    "catalog": "a TOML price catalog in USD per 1M tokens (default: the embedded one)",
    "default_input_usd_per_1m": "input price of models not in the catalog, USD per 1M"
    " tokens (default 0.10)",
    "default_output_usd_per_1m": "output price of models not in the catalog, USD per 1M"
    " tokens (default 0.20)",
    "sweep_interval": "seconds between releases of stale reservations (default 60)",
    "btc_usd": "pin the BTC/USD rate instead of asking live sources",
    "rate_mode": "auto (the dev wallet pins a constant) or live (always the sources)",
    "rate_refresh": "seconds between BTC/USD rate refreshes (default 300)",
    "rate_max_age": "seconds a rate may be old before paid requests stop (default 1800)",
    "rate_sources": "comma-separated BTC/USD sources (default: coinbase, kraken, bitstamp,"
    " coingecko, mempool)",
    "rate_urls": "comma-separated source=url overrides, e.g. through a proxy",
    "lightning": "the Lightning backend: dev (default, a built-in test wallet), lnbits,"
    " phoenixd or lnd",
    "lnbits_url": "LNbits base URL (its keys from the environment or a file)",
    "phoenixd_url": "phoenixd base URL (its password from the environment or a file)",
    "lnd_url": "LND REST base URL (its macaroon from the environment or a file)",
    "lnd_tls_cert": "the LND TLS certificate file",
    "topup_min_sats": "smallest top-up invoice in sats (default 10)",
    "topup_max_sats": "largest top-up invoice in sats (default 1000000)",
    "invoice_expiry": "seconds a top-up invoice stays payable (default 600)",
    "payout_threshold_sats": "providers' default payout threshold in sats (default 1000)",
    "payout_min_threshold_sats": "lowest threshold a provider may ask for (default 100)",
    "payout_max_threshold_sats": "highest threshold a provider may ask for (default 1000000)",
    "payout_interval": "seconds between payout rounds (default 30)",
    "lnurl_allow_private": "true: Lightning Addresses may resolve to private networks"
    " (tests only; default false)",
    "lnurl_base_url_override": "send every LNURL lookup to this base URL (tests only)",
    "admin": "serve the operator's admin socket (default true)",
    "owlrun_compat": "true: stock Go Owlrun agents may serve this gateway (default false)",
    "compat_concurrency": "jobs at once on one stock Go agent (default 1)",
    "compat_fetch_timeout": "seconds a stock agent has to fetch an accepted job before it"
    " moves on (default 10)",
    "cluster_interval": "seconds between a replica's heartbeats and directory reads"
    " (PostgreSQL; default 2)",
    "replica_liveness": "seconds of silence after which a replica is dead to the others"
    " (default 10)",
    "advertise_url": "how other replicas reach this one (default: the bound address)",
    "admin_socket": "the admin socket's path (default: next to the SQLite file)",
}

# What each operator command reads of the configuration; ``serve`` takes every setting.
STORE = ("database",)
ADMIN = ("database", "admin_socket")


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="a TOML configuration file (also ROUTECAT_CONFIG); flags win over the"
        " environment (ROUTECAT_*), which wins over the file",
    )
    for name in names:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=HELP[name],
        )


def setting_names() -> list[str]:
    """Every setting a flag may give (secrets only from the environment or a file)."""
    return [f.name for f in attrs.fields(Config) if not f.metadata.get("secret")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routecat",
        description="RouteCat: an OpenAI-compatible inference gateway paid per token in sats."
        " Start with `routecat demo` (everything on one machine) or `routecat serve`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway: HTTP API, web pages and the node websocket on one port."
        " Every setting may also come from ROUTECAT_<NAME> or the TOML file (docs/"
        "operations.md); secrets only from the environment or <NAME>_FILE.",
    )
    _add_setting_flags(serve, setting_names())
    demo = sub.add_parser(
        "demo",
        help="the whole system on this machine: gateway, a node, a real small model",
        description="Run the gateway, an owlrun node and a real small model (SmolLM2-135M"
        " on llama.cpp, built into a cache on the first run) on this machine, register and"
        " fund a demo key from the dev wallet, and print what to try. Ctrl-C stops"
        " everything.",
    )
    add_demo_options(demo)
    for name, help_text, actions in COMMAND_TREE:
        group = sub.add_parser(name, help=help_text, description=help_text)
        group_sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, action_help, positionals, settings in actions:
            leaf = group_sub.add_parser(action, help=action_help, description=action_help)
            for positional, meaning in positionals:
                if positional.startswith("--"):
                    leaf.add_argument(positional, type=int, required=True, help=meaning)
                else:
                    leaf.add_argument(positional, help=meaning)
            _add_setting_flags(leaf, settings)
    return parser


def add_demo_options(parser: argparse.ArgumentParser) -> None:
    from routecat.demo import MODEL_NAME, default_cache

    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8080, help="the gateway's port (default 8080; 0: a free one)"
    )
    parser.add_argument(
        "--database",
        default="routecat.db",
        help="the SQLite file (default ./routecat.db; `routecat serve` later finds the demo's"
        " key, jobs and ledger there)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache(),
        help=f"where the engine and the model are kept between runs (default {default_cache()})",
    )
    parser.add_argument(
        "--model-file",
        type=Path,
        default=None,
        help=f"a GGUF model file to serve instead of SmolLM2-135M ({MODEL_NAME})",
    )
    parser.add_argument(
        "--backend-url",
        default="",
        help="no model of its own: use an OpenAI-compatible engine already running at this"
        " URL (Ollama: http://localhost:11434, llama.cpp, vLLM); nothing is built",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for llama.cpp (default: half the CPUs, at least 1)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the engine and fetch the model into the cache, print where, and exit"
        " (for a machine image, or CI)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="the gateway's and the node's log level (default WARNING: the demo's own lines"
        " stay readable)",
    )


Positional = tuple[str, str]  # name (or --flag for an integer), meaning
COMMAND_TREE: list[tuple[str, str, list[tuple[str, str, list[Positional], Sequence[str]]]]] = [
    (
        "keys",
        "list, credit, revoke or rotate API keys (works offline, on the database)",
        [
            ("list", "every key: prefix, state, created, name", [], STORE),
            ("revoke", "revoke a key by its prefix", [("prefix", "the key's prefix")], ADMIN),
            (
                "rotate",
                "a new secret for a key, same account and balance (shown once)",
                [("prefix", "the key's prefix")],
                ADMIN,
            ),
            (
                "credit",
                "credit a key from operator equity (audited in the ledger)",
                [("prefix", "the key's prefix"), ("--sats", "how many sats")],
                STORE,
            ),
        ],
    ),
    (
        "wallet",
        "the dev wallet (needs the running gateway)",
        [
            (
                "pay",
                "pay an invoice this gateway issued (dev wallet)",
                [("invoice", "the BOLT11 invoice to pay")],
                ADMIN,
            )
        ],
    ),
    (
        "lightning",
        "Lightning reconciliation (needs the running gateway)",
        [("reconcile", "ask the backend about every pending top-up and payout now", [], ADMIN)],
    ),
    ("payouts", "provider payouts", [("list", "recent payouts and their state", [], STORE)]),
    (
        "ledger",
        "the double-entry ledger (works offline)",
        [
            ("check", "prove balances equal postings and all accounts sum to zero", [], STORE),
            (
                "history",
                "postings of one account",
                [("account", "user:ID, provider:NODE, operator:fee, ...")],
                STORE,
            ),
            ("accounts", "every account with its balance and reservations", [], STORE),
        ],
    ),
    (
        "db",
        "database maintenance",
        [
            (
                "backup",
                "online backup of the SQLite file",
                [("target", "the backup file to write")],
                STORE,
            ),
            (
                "migrate",
                "create or update the tables (safe with replicas starting at once)",
                [],
                STORE,
            ),
            (
                "copy",
                "copy a SQLite install into an empty database (e.g. PostgreSQL), then check both",
                [
                    ("source", "sqlite:///path of the install to copy"),
                    ("target", "the empty database (postgresql://...)"),
                ],
                (),
            ),
        ],
    ),
    (
        "nodes",
        "provider nodes",
        [
            (
                "list",
                "live nodes: kind, models, load, speed, health (needs the running gateway)",
                [],
                (*ADMIN, "replica_liveness"),
            ),
            (
                "ban",
                "ban a node id (and disconnect it if online)",
                [("node_id", "the node's id"), ("reason", "why, in words (kept)")],
                ADMIN,
            ),
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


def cmd_demo(_config: Config, args: argparse.Namespace) -> int:
    from routecat import demo

    options = demo.DemoOptions(
        **{f.name: getattr(args, f.name) for f in attrs.fields(demo.DemoOptions)}
    )
    if args.prepare_only:
        return demo.prepare(options)
    return demo.run(options)


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "demo": cmd_demo,
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
    if args.command == "demo":  # its own few options, not the operator's configuration
        setup_logging(args.log_level, "text")
        return cmd_demo(Config(), args)
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
