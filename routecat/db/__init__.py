"""The storage layer: the only SQL in ``routecat`` (the ledger keeps its own).

Every function here is a *transaction function*: it takes the ``Connection`` of one
open transaction (``ledger.store.Connection``), runs SQL, returns attrs values or
plain numbers, and never commits. A store runs them: ``await store.write(fn)`` /
``await store.read(fn)`` in the gateway, ``store.write_sync(fn)`` in offline operator
commands, so several of them (and the ledger's ``book`` functions) compose into one
atomic transaction where the money rules need it (admission, settlement, payouts).

That pair (a store with ``read``/``write`` and a connection with ``execute``) is the
storage interface: the SQL is written in the subset SQLite and PostgreSQL share
(``ON CONFLICT``, ``RETURNING``, ``COALESCE``, ``substr``, ``?`` placeholders that a
PostgreSQL connection adapter rewrites), so a second store implementation serves the
same functions. ``schema`` holds the tables; the modules are named for what they store.
"""
