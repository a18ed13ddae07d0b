"""``minions worker-host`` and ``minions keys generate``: the operator's side of scale-out."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from minions.pool.config import PoolConfig, SpawnMode

Subcommands = Any  # argparse's _SubParsersAction is private


def add_commands(commands: Subcommands) -> None:
    host = commands.add_parser(
        "worker-host",
        help="serve a WorkerService's workers to pools on other machines (tcp + CURVE)",
        description="Start WORKERS local worker processes of SERVICE for each pool it connects "
        "to, supervise them here, and serve them over ZeroMQ tcp with CURVE. Runs until "
        "SIGTERM; a pool that goes away is reconnected to, with fresh workers. Environment: "
        "MINIONS_LOG_LEVEL.",
    )
    host.add_argument("--connect", action="append", required=True, metavar="tcp://HOST:PORT",
                      help="a pool's listen address (repeat for several pools)")  # fmt: skip
    host.add_argument("--service", required=True, metavar="module:Class",
                      help="the WorkerService to serve (the pool's own)")  # fmt: skip
    host.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                      help="worker processes per pool (default: this machine's CPUs)")  # fmt: skip
    host.add_argument("--spare-workers", type=int, default=0, metavar="N",
                      help="booted spares per pool (default: 0)")  # fmt: skip
    host.add_argument("--key", required=True, metavar="PATH",
                      help="this host's secret key (NAME.key_secret; the pool's host_keys_dir "
                      "holds NAME.key)")  # fmt: skip
    host.add_argument("--server-key", required=True, metavar="PATH",
                      help="the pool's public key (its .key file)")  # fmt: skip
    host.add_argument("--max-rss-mb", type=float, default=0.0, metavar="MB",
                      help="recycle a worker above this RSS (default: none)")  # fmt: skip
    host.add_argument("--spawn", choices=[m.value for m in SpawnMode], default="zygote",
                      help="how workers start (default: zygote)")  # fmt: skip
    host.set_defaults(handler=_cmd_worker_host)

    keys = commands.add_parser(
        "keys", help="CURVE keys for worker hosts and listening pools",
        description="Make CURVE keypairs in ZeroMQ's certificate format.",
    )  # fmt: skip
    verbs = keys.add_subparsers(title="verbs", metavar="VERB", required=True)
    generate = verbs.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (keep it private)",
        description="Write DIR/NAME.key and DIR/NAME.key_secret (mode 0600). Give a pool's "
        ".key to its hosts (--server-key); put each host's .key in the pool's host_keys_dir, "
        "where NAME becomes the host's name in metrics and status.",
    )  # fmt: skip
    generate.add_argument("name", metavar="NAME", help="the host's or pool's name")
    generate.add_argument("--dir", default=".", metavar="DIR", help="where (default: .)")
    generate.set_defaults(handler=_cmd_keys_generate)


def _cmd_keys_generate(ns: argparse.Namespace) -> int:
    from minions.remote.keys import KeyFileError, generate

    try:
        public, secret = generate(ns.dir, ns.name)
    except KeyFileError as exc:
        print(f"minions keys generate: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (keep it on this machine only)")
    return 0


def _cmd_worker_host(ns: argparse.Namespace) -> int:
    from minions.remote.host import HostConfig, WorkerHost
    from minions.remote.keys import KeyFileError, load_public, load_secret

    level = os.environ.get("MINIONS_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    logging.basicConfig(
        level=logging.getLevelName(level) if level in logging.getLevelNamesMapping() else 20,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        load_secret(ns.key)
        load_public(ns.server_key)
        pool = PoolConfig(
            service=ns.service, name="host", workers=ns.workers, spare_workers=ns.spare_workers,
            max_rss_mb=ns.max_rss_mb, spawn=SpawnMode(ns.spawn), arena_mb=0.0,
        )  # fmt: skip
        cfg = HostConfig(tuple(ns.connect), pool, ns.key, ns.server_key)
    except (KeyFileError, ValueError) as exc:
        print(f"minions worker-host: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(WorkerHost(cfg).run())
    except (ImportError, AttributeError, TypeError) as exc:
        print(f"minions worker-host: cannot load service {ns.service!r}: {exc!r}", file=sys.stderr)
        return 2
