"""The operator's commands: ``pgregistry status | lookup | select | whereis | drain`` (layer 7).

Each connects to one running node as a tool (`pgregistry.inspection`): the cookie comes
from ``--cookie-file`` or ``PGREGISTRY_COOKIE``, never from the command line. The node
does not see a peer: no ``NodeUp``, nothing gossiped. With ``--json`` the output is one
JSON object ``{"schema": 1, ...}`` whose terms are tagged so that they round-trip
(`pgregistry.jsonterms`). KEY and NAME arguments are Python literals (``42``,
``"web"``, ``('user', 42)``); a bare word that is not one, such as ``web``, is that string.

Exit status: 0 done, 1 not found (an empty lookup, no holder, no such registry or
service), 2 bad usage, 3 the node could not be reached (or refused the cookie).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Final

from .errors import AuthenticationError
from .inspection import MAX_PAGE, InspectionClient, InspectionError
from .jsonterms import to_json
from .node_options import OptionError, read_cookie_file
from .terms import key_problem, short_repr

__all__ = ["COMMANDS", "add_commands", "run"]

SCHEMA: Final = 1
OK, NOT_FOUND, USAGE, UNREACHABLE = 0, 1, 2, 3

COMMANDS: Final = ("status", "lookup", "select", "whereis", "drain")


class Usage(Exception):
    """A usage error found after parsing (exit status 2)."""


class NotFound(Exception):
    """What was asked for does not exist (exit status 1)."""


class Refused(Exception):
    """The node refused the tool (it is stopping, or serves no tools): exit status 3."""


def parse_term(text: str, what: str) -> Any:
    """A KEY or NAME argument: a Python literal, or a bare word as that string."""
    try:
        term = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if text.isidentifier():
            return text
        raise Usage(f"{what} must be a Python literal such as 42, 'web' or ('user', 42); got {text!r}") from None
    problem = key_problem(term)
    if problem is not None:
        raise Usage(f"{what} {text!r} is not a key: {problem}")
    return term


def add_commands(commands: Any) -> None:
    """Add the operator's subcommands to the ``pgregistry`` parser's `commands`."""
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("address", help="the node: host:port or its node id")
        parser.add_argument("--cookie-file", metavar="PATH",
                            help="file holding the cluster's cookie (mode 600); default $PGREGISTRY_COOKIE")
        parser.add_argument("--json", action="store_true", help="print one JSON object (terms tagged to round-trip)")
        parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                            help="seconds to connect and for each request (5)")

    status = commands.add_parser("status", help="what a running node holds: peers, registries, names, workers")
    common(status)
    lookup = commands.add_parser("lookup", help="the entries of one key in a registry of a running node")
    common(lookup)
    lookup.add_argument("scope", help="the registry")
    lookup.add_argument("key", help="the key, a Python literal ('web' may be written web)")
    select = commands.add_parser("select", help="every entry of a registry of a running node, page by page")
    common(select)
    select.add_argument("scope", help="the registry")
    select.add_argument("--limit", type=int, default=100, metavar="N", help="print at most N rows (100)")
    select.add_argument("--cursor", type=int, default=0, metavar="C",
                        help="start at row C (the 'next' of an earlier --json output)")
    whereis = commands.add_parser("whereis", help="the holder of a cluster-wide name on a running node")
    common(whereis)
    whereis.add_argument("name", help="the name, a Python literal")
    whereis.add_argument("--service", default="names", help="the names service (names)")
    drain = commands.add_parser("drain", help="ask a running node to stop gracefully (as on SIGTERM)")
    common(drain)


def run(args: argparse.Namespace) -> int:
    """Run the operator's command `args.command`; the exit status."""
    try:
        cookie = _cookie(args)
        job: Callable[[InspectionClient, argparse.Namespace], Coroutine[Any, Any, Any]] = _JOBS[args.command]
        output = asyncio.run(_with_client(args, cookie, job))
    except Usage as exc:
        print(f"pgregistry {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except NotFound as exc:
        print(f"pgregistry {args.command}: {exc}", file=sys.stderr)
        return NOT_FOUND
    except (OSError, TimeoutError, AuthenticationError, ConnectionError, Refused) as exc:
        print(f"pgregistry {args.command}: cannot reach {args.address}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return UNREACHABLE
    if args.json:
        print(json.dumps({"schema": SCHEMA, **to_json(output)}, allow_nan=False))
    else:
        print(_human(args.command, output))
    return OK


def _cookie(args: argparse.Namespace) -> str:
    if args.cookie_file is not None:
        try:
            return read_cookie_file(args.cookie_file)
        except OptionError as exc:
            raise Usage(str(exc)) from None
    cookie = os.environ.get("PGREGISTRY_COOKIE")
    if not cookie:
        raise Usage("no cookie: give --cookie-file PATH or set PGREGISTRY_COOKIE")
    return cookie


async def _with_client(args: argparse.Namespace, cookie: str,
                       job: Callable[[InspectionClient, argparse.Namespace], Coroutine[Any, Any, Any]]) -> Any:
    if args.timeout <= 0:
        raise Usage("--timeout must be > 0")
    try:
        client = await InspectionClient.connect(args.address, cookie, timeout=args.timeout)
    except InspectionError as exc:
        raise Refused(str(exc)) from None
    try:
        return await job(client, args)
    except InspectionError as exc:
        if str(exc).startswith("LookupError"):
            raise NotFound(str(exc).partition(": ")[2]) from None
        raise Usage(str(exc)) from None
    finally:
        await client.close()


async def _status(client: InspectionClient, args: argparse.Namespace) -> dict[str, Any]:
    t = args.timeout
    return {"version": await client.request("version", timeout=t), "info": await client.request("info", timeout=t),
            "peers": await client.request("peers", timeout=t), "stat": await client.request("stat", timeout=t)}


async def _lookup(client: InspectionClient, args: argparse.Namespace) -> dict[str, Any]:
    key = parse_term(args.key, "KEY")
    entries = await client.request("lookup", args.scope, key, timeout=args.timeout)
    if not entries:
        raise NotFound(f"no entry under {key!r} in registry {args.scope!r} on {client.node_id}")
    return {"node": client.node_id, "scope": args.scope, "key": key, "entries": [list(e) for e in entries]}


async def _select(client: InspectionClient, args: argparse.Namespace) -> dict[str, Any]:
    if args.limit < 1 or args.cursor < 0:
        raise Usage("--limit must be >= 1 and --cursor >= 0")
    rows: list[Any] = []
    cursor: int | None = args.cursor
    total = 0
    skipped = 0
    while cursor is not None and len(rows) < args.limit:
        page = await client.request("select", args.scope, cursor, min(MAX_PAGE, args.limit - len(rows)),
                                    timeout=args.timeout)
        if page["next"] is not None and page["next"] <= cursor:
            raise Usage(f"the node's select made no progress at row {cursor}")  # never loop forever
        rows += page["rows"]
        skipped += page.get("skipped", 0)
        cursor, total = page["next"], page["total"]
    return {"node": client.node_id, "scope": args.scope, "rows": [list(r) for r in rows], "total": total,
            "next": cursor, "skipped": skipped}


async def _whereis(client: InspectionClient, args: argparse.Namespace) -> dict[str, Any]:
    name = parse_term(args.name, "NAME")
    held = await client.request("whereis", args.service, name, timeout=args.timeout)
    if held is None:
        raise NotFound(f"no valid holder of {name!r} in names service {args.service!r} as {client.node_id} knows it")
    return {"node": client.node_id, "service": args.service, "name": name, "pid": held[0], "token": held[1]}


async def _drain(client: InspectionClient, args: argparse.Namespace) -> dict[str, Any]:
    return {"node": client.node_id, "result": await client.request("drain", timeout=args.timeout)}


_JOBS: Final[dict[str, Callable[[InspectionClient, argparse.Namespace], Coroutine[Any, Any, Any]]]] = {
    "status": _status, "lookup": _lookup, "select": _select, "whereis": _whereis, "drain": _drain,
}


def _human(command: str, out: dict[str, Any]) -> str:
    """The output of `command` for a person."""
    if command == "status":
        info, version, stats = out["info"], out["version"], out["stat"]
        lines = [f"node {info['id']}  (pgregistry {version['pgregistry']}, protocol {version['protocol']}, "
                 f"table {version['core']}, OS pid {info['os_pid']})",
                 f"peers: {len(info['peers'])}" + "".join(f"\n  {p}" for p in info["peers"])]
        for scope, st in sorted(stats["scopes"].items()):
            lines.append(f"registry {scope}: {st['rows']} entries, {st['peers']} peers, {st['subscribers']} "
                         f"subscribers")
        for name, st in sorted(stats["names"].items()):
            lines.append(f"names {name}: {len(st.get('members', []))} members, {st.get('held_here', 0)} held here, "
                         f"lease valid: {st.get('lease_valid')}")
        for name, st in sorted(stats["workers"].items()):
            lines.append(f"workers {name}: {st['workers']} workers ({st['local']} here, {st['adopted']} adopted), "
                         f"{st['nodes']} nodes on the ring")
        return "\n".join(lines)
    if command == "lookup":
        return "\n".join(f"{pid}  {short_repr(value, 1000)}" for pid, value in out["entries"])
    if command == "select":
        rows = [f"{short_repr(key, 200)}  {pid}  {short_repr(value, 1000)}" for key, pid, value in out["rows"]]
        more = f"\n({len(out['rows'])} of {out['total']}; more with --cursor {out['next']})" \
            if out["next"] is not None else ""
        skipped = f"\n({out['skipped']} rows too large to send were left out)" if out["skipped"] else ""
        return "\n".join(rows) + more + skipped
    if command == "whereis":
        return f"{out['pid']}  token {out['token']}"
    return f"{out['node']}: {out['result']}"
