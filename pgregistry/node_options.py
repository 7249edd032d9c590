"""The options of ``pgregistry node`` beyond argparse: config file, cookie file, TLS, start-up errors.

`prepare` runs once the command line is parsed, before the node starts. It merges a
``--config`` TOML file under the command line (a flag given on the command line wins),
checks the combinations argparse cannot, reads the ``--cookie-file``, builds the TLS
context of ``--tls-cert/--tls-key/--tls-ca`` and refuses an unspecified ``--host``
without ``--advertise-host``. A problem is an `OptionError`: one line that names the
option (or the config key) and the cause, for exit status 2; a forbidden combination of
flags is a usage error of the node parser (exit status 2 too).

`startup_error` words the `OSError` of a node that cannot listen (a port in use, an
address not of this machine, an unknown host) the same way, and `connect_until` is
``--connect`` retrying while the target is not up yet.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import socket
import ssl
import stat
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from .errors import AuthenticationError, RegistryError
from .handshake import HandshakeError
from .node import Node
from .node import _unspecified as unspecified_host
from .terms import short_repr
from .tls import node_context

__all__ = ["OptionError", "prepare", "read_cookie_file", "startup_error", "connect_until"]

#: The options whose values are files: relative paths in a config file are taken from its directory.
PATH_KEYS: Final = frozenset({"cookie_file", "tls_cert", "tls_key", "tls_ca"})
#: The TLS options: all three or none.
TLS_KEYS: Final = ("tls_cert", "tls_key", "tls_ca")
#: Pauses between ``--connect`` attempts: the first, and the longest.
CONNECT_PAUSE: Final = 0.05
CONNECT_MAX_PAUSE: Final = 2.0


class OptionError(Exception):
    """A start-up error of ``pgregistry node``: its text is one line naming the option and the cause."""


def _node_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``node`` subcommand's parser within the ``pgregistry`` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            node: argparse.ArgumentParser = action.choices["node"]
            return node
    raise LookupError("the pgregistry parser has no node command")


def _settable(node: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The node options a config file may set, by key (the option's dest)."""
    return {action.dest: action for action in node._actions
            if action.option_strings and action.dest not in ("help", "config")}


def _given(parser_factory: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> set[str]:
    """The keys of the node options given on the command line (parsed again, without defaults)."""
    parser = parser_factory()
    for action in _node_parser(parser)._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


# --------------------------------------------------------------------------- --config

def load_config(path: str, node: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings of the TOML file at `path`, checked against the node options; `OptionError` if bad."""
    where = f"--config {path}"
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise OptionError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"{where}: not valid TOML: {exc}") from None
    settable = _settable(node)
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key == "cookie":
            raise OptionError(f"{where}: key 'cookie' is refused: a secret does not belong in a config file; "
                              "put it in a file only its owner can read and set cookie_file")
        action = settable.get(key)
        if action is None:
            raise OptionError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(settable))})")
        settings[key] = _config_value(where, key, value, action)
        if key in PATH_KEYS and not os.path.isabs(settings[key]):
            settings[key] = str(Path(path).resolve().parent / settings[key])
    return settings


def _config_value(where: str, key: str, value: Any, action: argparse.Action) -> Any:
    """`value` for `key` as the option `action` would have parsed it; `OptionError` if it cannot be."""
    def wrong(expected: str) -> OptionError:
        return OptionError(f"{where}: key {key!r} must be {expected}, got {type(value).__name__} "
                           f"{short_repr(value, 60)}")

    if action.nargs == 0:  # a flag
        if type(value) is not bool:
            raise wrong("true or false")
        return value
    if action.nargs in ("+", "*"):
        if type(value) is not list or any(type(item) is not str or not item for item in value):
            raise wrong("a list of non-empty strings")
        return value
    if action.nargs == "?":  # --names [SERVICE]: true for the default service
        if type(value) is bool:
            return action.const if value else None
        if type(value) is not str or not value:
            raise wrong(f"a non-empty string, or true (for {action.const!r})")
        return value
    if action.type is float:
        if type(value) not in (int, float):
            raise wrong("a number")
        return float(value)
    if action.type is int:
        if type(value) is not int:
            raise wrong("an integer")
        return value
    if type(value) is not str or not value:
        raise wrong("a non-empty string")
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


# --------------------------------------------------------------------------- --cookie-file

def read_cookie_file(path: str) -> str:
    """The cookie in the file at `path`, without its trailing newline.

    `OptionError` (never quoting the file's content) when the file is missing,
    unreadable, not a regular file, readable or writable by group or others, or empty.
    """
    where = f"--cookie-file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise OptionError(f"{where}: no such file") from None
    except OSError as exc:
        raise OptionError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OptionError(f"{where}: not a regular file")
        if info.st_mode & 0o077:
            raise OptionError(f"{where}: readable or writable by group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); make it private: chmod 600 {path}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(1024 * 1024 + 1)
    except OSError as exc:
        raise OptionError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > 1024 * 1024:
        raise OptionError(f"{where}: larger than 1 MiB, not a cookie")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"{where}: not UTF-8 text") from None
    cookie = text.removesuffix("\n").removesuffix("\r")
    if not cookie:
        raise OptionError(f"{where}: empty (it must hold the cookie)")
    return cookie


# --------------------------------------------------------------------------- prepare

def prepare(args: argparse.Namespace, argv: Sequence[str] | None,
            parser_factory: Callable[[], argparse.ArgumentParser]) -> None:
    """Complete the parsed node options `args` in place, ready for `run_node`.

    Merges ``--config`` (the command line wins), checks the combinations (usage errors
    exit through the node parser), reads ``--cookie-file`` into ``args.cookie`` and sets
    ``args.ssl`` (the TLS context, or None). `OptionError` for a start-up error.
    """
    node = _node_parser(parser_factory())
    if args.config is not None:
        given = _given(parser_factory, argv)
        for key, value in load_config(args.config, node).items():
            if key not in given:
                setattr(args, key, value)
    if args.name is None:
        node.error("the following arguments are required: --name (or name in --config)")
    if args.names is None:
        alone = [option for option, value in (("--lease", args.lease), ("--join", args.join)) if value is not None]
        if alone:
            node.error(f"{' and '.join(alone)} need{'s' if len(alone) == 1 else ''} --names")
    if not 0 < args.connect_timeout < float("inf"):
        node.error(f"--connect-timeout must be a positive number of seconds, got {args.connect_timeout}")
    if not 0 < args.shutdown_timeout < float("inf"):
        node.error(f"--shutdown-timeout must be a positive number of seconds, got {args.shutdown_timeout}")
    if args.cookie is not None and args.cookie_file is not None:
        node.error("--cookie and --cookie-file: give one of them (prefer --cookie-file)")
    tls = [getattr(args, key) for key in TLS_KEYS]
    if any(value is not None for value in tls) and None in tls:
        missing = [f"--{key.replace('_', '-')}" for key, value in zip(TLS_KEYS, tls) if value is None]
        node.error(f"--tls-cert, --tls-key and --tls-ca go together: {' and '.join(missing)} missing")
    if args.cookie_file is not None:
        args.cookie = read_cookie_file(args.cookie_file)
    if args.advertise_host is None and unspecified_host(args.host):
        raise OptionError(f"--host {args.host}: every address of this machine, so peers could not dial the node id "
                          f"{args.name}@{args.host}:port back; give --advertise-host, the host peers reach it at")
    args.ssl = None
    if tls[0] is not None:
        args.ssl = _tls_context(args.tls_cert, args.tls_key, args.tls_ca)


def _tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        try:
            open(path, "rb").close()  # readable: the one check that tells the option apart
        except OSError as exc:
            raise OptionError(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        return node_context(cert, key, ca)
    except ssl.SSLError as exc:
        raise OptionError(f"--tls-cert {cert} --tls-key {key} --tls-ca {ca}: not a usable certificate, key and "
                          f"CA: {exc.reason or exc}") from None
    except OSError as exc:
        raise OptionError(f"--tls-cert {cert} --tls-key {key} --tls-ca {ca}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- start-up errors

def startup_error(exc: OSError, host: str, port: int) -> str:
    """One line naming the option and the cause of a node that could not listen on `host`:`port`."""
    if isinstance(exc, socket.gaierror):
        return f"--host {host}: unknown host ({exc.strerror or exc})"
    if exc.errno == errno.EADDRINUSE:
        return f"--port {port}: address already in use (another socket holds {host}:{port})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: cannot assign requested address (not an address of this machine)"
    if exc.errno == errno.EACCES:
        return f"--port {port}: permission denied (a port below 1024 needs privileges)"
    return f"--host {host} --port {port}: cannot listen: {exc.strerror or exc}"


# --------------------------------------------------------------------------- --connect

def _lasting(exc: OSError) -> bool:
    """Whether a failed connect will fail the same way if tried again (not just "not up yet")."""
    if isinstance(exc, HandshakeError):
        return exc.kind != "closed"
    if isinstance(exc, ssl.SSLError):
        return not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    return False


async def connect_until(node: Node, address: str, timeout: float) -> str | None:
    """Connect `node` to `address`, trying again while nothing answers there, for `timeout` s.

    Pauses between attempts grow exponentially (from `CONNECT_PAUSE` to
    `CONNECT_MAX_PAUSE`). Returns None once connected, else why not as one line: at
    once for a refusal that will not change (`AuthenticationError`, a certificate not
    trusted, a bad address), else when `timeout` is over.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = CONNECT_PAUSE
    while True:
        try:
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                await node.connect(address)
            return None
        except (AuthenticationError, ValueError, TypeError) as exc:  # ssl.SSLCertVerificationError too
            return f"{type(exc).__name__}: {exc}"
        except OSError as exc:  # refused, unreachable, reset, timed out: maybe not up yet
            if _lasting(exc):
                return f"{type(exc).__name__}: {exc}"
            last = exc
        except RegistryError as exc:
            return f"{type(exc).__name__}: {exc}"
        if loop.time() + pause >= deadline:
            return f"not connected within {timeout:g} s (last attempt: {type(last).__name__}: {last})"
        await asyncio.sleep(pause)
        pause = min(2 * pause, CONNECT_MAX_PAUSE)
