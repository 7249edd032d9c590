"""``pgregistry node`` under a process manager: cookie file, advertised host, TLS, keys,
``--connect`` retries, ``--config``, and start-up errors as one line.

Every test runs ``python -m pgregistry node`` as real subprocesses, each bounded in time
and killed on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgregistry import node_options
from pgregistry._control import ControlError, control
from pgregistry.cli import _parser
from pgregistry.node import Node

from .helpers import eventually
from .test_cli import _read_line
from .tls_certs import TestCA

ROOT = Path(__file__).resolve().parent.parent
COOKIE = "node-flags-test-cookie"
SECRET = "s3cret-cookie-from-a-file"
T = 10.0
PREFIX = "pgregistry node: error: "

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def _start(*args: str, cookie: str | None = COOKIE, cwd: Path = ROOT) -> subprocess.Popen[str]:
    """``pgregistry node ARGS`` in a subprocess (PGREGISTRY_COOKIE = `cookie`, unset if None)."""
    env = {key: value for key, value in os.environ.items() if key != "PGREGISTRY_COOKIE"}
    env["PYTHONPATH"] = str(ROOT)
    if cookie is not None:
        env["PGREGISTRY_COOKIE"] = cookie
    return subprocess.Popen([sys.executable, "-m", "pgregistry", "node", "--test-control", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _node_id(proc: subprocess.Popen[str]) -> str:
    line = _read_line(proc)
    if not line.startswith("NODE "):
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        raise AssertionError(f"no NODE line: {line!r}\n{err}")
    return line.split()[1]


@contextlib.contextmanager
def _running(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """`procs`, killed and reaped on the way out."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def _fails(*args: str, status: int = 2, cookie: str | None = COOKIE, timeout: float = 20.0) -> str:
    """Run a node that must fail with `status`; its stderr, checked to be one line without a traceback."""
    proc = _start(*args, cookie=cookie)
    with _running(proc):
        out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == status, err
    assert out == "" and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


async def _stop(*procs: subprocess.Popen[str]) -> list[str]:
    """SIGTERM `procs`; check each exits 0; their stderr."""
    for proc in procs:
        proc.terminate()
    errs = []
    for proc in procs:
        _out, err = await asyncio.to_thread(proc.communicate, timeout=10)
        assert proc.returncode == 0, err
        errs.append(err)
    return errs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- --cookie-file

async def test_cookie_file_is_read_and_never_shown(tmp_path: Path) -> None:
    cookie_file = _private(tmp_path / "cookie", SECRET + "\n")
    a = _start("--name", "a", "--cookie-file", str(cookie_file), "--log-level", "debug", cookie=None)
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        assert SECRET.encode() not in Path(f"/proc/{a.pid}/cmdline").read_bytes()
        # The same cookie from the environment (no newline): the newline was stripped.
        b = _start("--name", "b", "--connect", a_id, "--log-level", "debug", cookie=SECRET)
        # And from --cookie, which keeps working.
        c = _start("--name", "c", "--connect", a_id, "--cookie", SECRET, cookie=None)
        with _running(b, c):
            b_id = await asyncio.to_thread(_node_id, b)
            c_id = await asyncio.to_thread(_node_id, c)

            async def met() -> bool:
                async with Node("t", cookie=SECRET) as t:
                    await t.connect(a_id)
                    return sorted((await control(a_id, ("info",)))["peers"]) == sorted([b_id, c_id, t.id])

            await eventually(met, T, "a to meet b and c")
            errs = await _stop(a, b, c)
    assert not any(SECRET in err for err in errs), errs
    assert "random cookie" not in errs[0]


def _bad_cookie_files(tmp_path: Path) -> list[tuple[str, str]]:
    cases = []
    for mode in (0o644, 0o640, 0o604, 0o620, 0o602):
        path = tmp_path / f"cookie-{mode:o}"
        path.write_text(SECRET)
        path.chmod(mode)
        cases.append((str(path), f"readable or writable by group or others (mode 0{mode:o})"))
    cases.append((str(tmp_path / "missing"), "no such file"))
    cases.append((str(_private(tmp_path / "empty", "\n")), "empty"))
    directory = tmp_path / "a-directory"
    directory.mkdir(mode=0o700)
    cases.append((str(directory), "not a regular file"))
    if os.geteuid() != 0:  # root reads any file, whatever its mode
        unreadable = tmp_path / "unreadable"
        unreadable.write_text(SECRET)
        unreadable.chmod(0o000)
        cases.append((str(unreadable), "cannot read it: Permission denied"))
    return cases


def test_a_bad_cookie_file_is_refused_in_one_line(tmp_path: Path) -> None:
    for path, cause in _bad_cookie_files(tmp_path):
        err = _fails("--name", "n", "--cookie-file", path)
        assert err == f"{PREFIX}--cookie-file {path}: {cause}" or err.startswith(f"{PREFIX}--cookie-file {path}: "
                                                                               f"{cause}"), err
        assert SECRET not in err


def test_cookie_file_and_cookie_together_are_a_usage_error(tmp_path: Path) -> None:
    cookie_file = _private(tmp_path / "cookie", SECRET)
    proc = _start("--name", "n", "--cookie-file", str(cookie_file), "--cookie", "x")
    with _running(proc):
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and out == "", err
    assert err.startswith("usage: pgregistry node") and "--cookie and --cookie-file: give one of them" in err


# --------------------------------------------------------------------------- --advertise-host

async def test_a_node_on_every_address_advertises_its_host_and_connects_both_ways() -> None:
    wide = ["--host", "0.0.0.0", "--advertise-host", "127.0.0.1"]
    a = _start("--name", "a", *wide)
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        assert re.fullmatch(r"a@127\.0\.0\.1:\d+", a_id), a_id
        b = _start("--name", "b", "--connect", a_id)  # dials the wide node at its advertised id
        with _running(b):
            b_id = await asyncio.to_thread(_node_id, b)
            c = _start("--name", "c", *wide, "--connect", b_id)  # a wide node dials out
            with _running(c):
                c_id = await asyncio.to_thread(_node_id, c)
                assert c_id.startswith("c@127.0.0.1:")

                async def mesh() -> bool:
                    infos = [await control(node, ("info",)) for node in (a_id, b_id, c_id)]
                    return all(sorted(info["peers"]) == sorted({a_id, b_id, c_id, t.id} - {info["id"]})
                               for info in infos)

                async with Node("t", cookie=COOKIE) as t:
                    for node in (a_id, b_id, c_id):
                        await t.connect(node)
                    await eventually(mesh, T, "a, b and c (and t) to be connected by their advertised ids")
                await _stop(a, b, c)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_every_address_without_advertise_host_is_refused(host: str) -> None:
    err = _fails("--name", "n", "--host", host)
    assert err.startswith(f"{PREFIX}--host {host}: ") and "could not dial" in err and "--advertise-host" in err


# --------------------------------------------------------------------------- TLS

def _tls(ca: TestCA, name: str, trust: TestCA | None = None) -> list[str]:
    cert, key = ca.issue(name, (name,))
    return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str((trust or ca).cert)]


async def test_tls_nodes_connect_and_an_untrusted_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "other").mkdir()
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other")
    a = _start("--name", "a", *_tls(ca, "a"))
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        b = _start("--name", "b", *_tls(ca, "b"), "--connect", a_id)
        with _running(b):
            assert (await asyncio.to_thread(_node_id, b)).startswith("b@127.0.0.1:")  # connected: TLS both ways
            # A node of another CA that does not know the cluster's CA: refused at once.
            began = time.monotonic()
            err = await asyncio.to_thread(_fails, "--name", "c", *_tls(other, "c"), "--connect", a_id, status=1)
            assert err.startswith(f"{PREFIX}cannot connect to {a_id}: SSLCertVerificationError: "), err
            assert "certificate verify failed" in err and time.monotonic() - began < 15
            # One that trusts the cluster's CA but whose certificate another CA signed: a refuses it.
            err = await asyncio.to_thread(_fails, "--name", "d", *_tls(other, "d", trust=ca), "--connect", a_id,
                                          "--connect-timeout", "1", status=1)
            assert err.startswith(f"{PREFIX}cannot connect to {a_id}: "), err
            # A plaintext node gets nowhere either.
            err = await asyncio.to_thread(_fails, "--name", "e", "--connect", a_id, "--connect-timeout", "1",
                                          status=1)
            assert err.startswith(f"{PREFIX}cannot connect to {a_id}: "), err
            await _stop(a, b)


@pytest.mark.parametrize("given", [["--tls-cert"], ["--tls-cert", "--tls-key"], ["--tls-ca"]])
def test_tls_options_go_together(given: list[str]) -> None:
    args = [part for option in given for part in (option, "x.pem")]
    proc = _start("--name", "n", *args)
    with _running(proc):
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and err.startswith("usage: "), err
    assert "--tls-cert, --tls-key and --tls-ca go together" in err


def test_unusable_tls_files_are_one_line(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    cert, key = ca.issue("n", ("n",))
    missing = tmp_path / "missing.pem"
    err = _fails("--name", "n", "--tls-cert", str(cert), "--tls-key", str(missing), "--tls-ca", str(ca.cert))
    assert err == f"{PREFIX}--tls-key {missing}: cannot read it: No such file or directory", err
    _other_cert, other_key = ca.issue("m", ("m",))
    err = _fails("--name", "n", "--tls-cert", str(cert), "--tls-key", str(other_key), "--tls-ca", str(ca.cert))
    assert err.startswith(f"{PREFIX}--tls-cert {cert} --tls-key {other_key} --tls-ca {ca.cert}: "), err


def _doc_block(section: str, index: int) -> str:
    text = (ROOT / "docs" / "deployment.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end if end != -1 else None], flags=re.S)
    return str(blocks[index])


async def test_the_openssl_example_of_the_deployment_guide_works(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not on PATH")
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", _doc_block("TLS", 0)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "cookie").stat().st_mode & 0o077 == 0
    assert (tmp_path / "a-key.pem").stat().st_mode & 0o077 == 0
    port = _free_port()
    # The second block, as written, but on a free port and with this interpreter.
    commands = _doc_block("TLS", 1).replace("\\\n", " ").replace("4370", str(port)).splitlines()
    argvs = [line.split()[2:] for line in commands if line.startswith("pgregistry node ")]
    assert len(argvs) == 2, commands
    a = _start(*argvs[0], cookie=None, cwd=tmp_path)
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        assert a_id == f"a@127.0.0.1:{port}"
        b = _start(*argvs[1], cookie=None, cwd=tmp_path)
        with _running(b):
            b_id = await asyncio.to_thread(_node_id, b)
            assert b_id.startswith("b@127.0.0.1:")
            # A node with a certificate of the right CA but another name cannot claim to be "x".
            x = _start("--name", "x", "--cookie-file", "cookie", "--tls-cert", "b.pem", "--tls-key", "b-key.pem",
                       "--tls-ca", "ca.pem", "--connect", a_id, cookie=None, cwd=tmp_path)
            with _running(x):
                _out, err = await asyncio.to_thread(x.communicate, timeout=20)
                assert x.returncode == 1 and "does not prove node id" in err, err
            await _stop(a, b)


# --------------------------------------------------------------------------- --keys

@pytest.mark.parametrize("keys", ["unique", "duplicate", None])
async def test_keys_sets_the_keys_of_the_scope_registries(keys: str | None) -> None:
    a = _start("--name", "a", "--scope", "jobs", *(["--keys", keys] if keys else []))
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        async with Node("t", cookie=COOKIE) as t:
            await t.connect(a_id)
            await control(a_id, ("register", "jobs", "k", 1, 1))
            if keys == "unique":
                with pytest.raises(ControlError, match="in unique registry 'jobs'"):
                    await control(a_id, ("register", "jobs", "k", 2, 1))
                assert len(await control(a_id, ("lookup", "jobs", "k"))) == 1
            else:
                await control(a_id, ("register", "jobs", "k", 2, 1))
                assert len(await control(a_id, ("lookup", "jobs", "k"))) == 2
        await _stop(a)


# --------------------------------------------------------------------------- --connect retries

async def test_connect_waits_for_a_target_that_is_not_up_yet() -> None:
    port = _free_port()
    b = _start("--name", "b", "--connect", f"127.0.0.1:{port}", "--connect-timeout", "20")
    with _running(b):
        await asyncio.sleep(1.5)  # b is trying: nothing listens there yet
        assert b.poll() is None
        a = _start("--name", "a", "--port", str(port))
        with _running(a):
            a_id = await asyncio.to_thread(_node_id, a)
            b_id = await asyncio.to_thread(_node_id, b)
            await eventually(lambda: _peers_are(a_id, [b_id]), T, "a to see b")
            await _stop(a, b)


async def _peers_are(node_id: str, peers: list[str]) -> bool:
    async with Node("t", cookie=COOKIE) as t:
        await t.connect(node_id)
        return sorted((await control(node_id, ("info",)))["peers"]) == sorted([*peers, t.id])


def test_a_node_still_connecting_stops_at_once_on_sigterm() -> None:
    port = _free_port()
    proc = _start("--name", "b", "--connect", f"127.0.0.1:{port}", "--connect-timeout", "30")
    with _running(proc):
        time.sleep(1.0)
        assert proc.poll() is None  # still trying
        began = time.monotonic()
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and out == "" and "Traceback" not in err, err
    assert time.monotonic() - began < 8  # not the 30 s of --connect-timeout


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_connect_timeout_must_be_positive(value: str) -> None:
    proc = _start("--name", "n", "--connect-timeout", value)
    with _running(proc):
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "--connect-timeout must be a positive number of seconds" in err, err


def test_connect_gives_up_after_connect_timeout() -> None:
    port = _free_port()
    began = time.monotonic()
    err = _fails("--name", "b", "--connect", f"127.0.0.1:{port}", "--connect-timeout", "1", status=1)
    assert 0.9 < time.monotonic() - began < 15
    assert err.startswith(f"{PREFIX}cannot connect to 127.0.0.1:{port}: not connected within 1 s "
                          "(last attempt: ConnectionRefusedError"), err


async def test_a_wrong_cookie_fails_connect_at_once() -> None:
    a = _start("--name", "a")
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        began = time.monotonic()
        err = await asyncio.to_thread(_fails, "--name", "b", "--connect", a_id, status=1, cookie="another-cookie")
        assert time.monotonic() - began < 10  # well before --connect-timeout (30 s)
        assert err.startswith(f"{PREFIX}cannot connect to {a_id}: AuthenticationError: "), err
        assert "another-cookie" not in err and COOKIE not in err
        await _stop(a)


# --------------------------------------------------------------------------- --config

async def test_config_sets_every_option_and_the_command_line_wins(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    a = _start("--name", "a", "--names", "--lease", "1", *_tls(ca, "a"), cookie=SECRET)
    with _running(a):
        a_id = await asyncio.to_thread(_node_id, a)
        cert, key = ca.issue("full", ("full",))
        _private(tmp_path / "cookie", SECRET + "\n")
        config = tmp_path / "node.toml"
        config.write_text(f"""
name = "from-config"
host = "127.0.0.1"
port = 0
advertise_host = "127.0.0.1"
cookie_file = "cookie"  # relative: from the config file's directory
tls_cert = "{cert}"
tls_key = "{key}"
tls_ca = "{ca.cert}"
scope = ["jobs", "events"]
keys = "unique"
connect = ["{a_id}"]
connect_timeout = 10
tick_interval = 0.2
down_after = 1
names = true
lease = 1.0
join = "{a_id}"
join_timeout = 10.0
workers = "sessions"
exit_with_stdin = false
log_level = "info"
log_format = "plain"
discover = ["static:{a_id.rpartition('@')[2]}"]
metrics_host = "127.0.0.1"
metrics_port = {_free_port()}
shutdown_timeout = 5.0
test_control = true
""")
        # Every option of the node command has its key in that file, but --config and --cookie (refused).
        settable = set(node_options._settable(node_options._node_parser(_parser())))
        assert settable - {"cookie"} == {key.split(" = ")[0] for key in config.read_text().splitlines() if " = " in key}
        full = _start("--config", str(config), "--name", "full", "--scope", "events", cookie=None, cwd=ROOT)
        with _running(full):
            full_id = await asyncio.to_thread(_node_id, full)
            assert full_id.startswith("full@127.0.0.1:")  # --name on the command line wins
            stat = await _control_via_tls(ca, tmp_path, a_id, full_id)
            assert stat["scopes"] == ["events"]  # --scope replaced the config's list, not extended it
            assert stat["names"] == ["names"] and a_id in stat["peers"]
            errs = await _stop(full, a)
        assert SECRET not in errs[0] and "listening" in errs[0]  # log_level = "info" took effect


async def _control_via_tls(ca: TestCA, tmp_path: Path, a_id: str, node_id: str) -> dict[str, object]:
    from pgregistry.tls import node_context

    cert, key = ca.issue("t", ("t",))
    async with Node("t", cookie=SECRET, ssl=node_context(cert, key, ca.cert)) as t:
        await t.connect(node_id)
        info: dict[str, object] = await control(node_id, ("info",))
        members = (await control(node_id, ("names_stat", "names")))["members"]
        assert sorted(members) == sorted([a_id, node_id])  # joined a's names cluster
        return info


@pytest.mark.parametrize(("text", "cause"), [
    ('nmae = "x"\n', "unknown key 'nmae' (known: "),
    ('down_after = "2"\n', "key 'down_after' must be a number, got str '2'"),
    ("port = 1.5\n", "key 'port' must be an integer, got float 1.5"),
    ('scope = "jobs"\n', "key 'scope' must be a list of non-empty strings, got str 'jobs'"),
    ("exit_with_stdin = 1\n", "key 'exit_with_stdin' must be true or false, got int 1"),
    ('keys = "several"\n', "key 'keys' must be one of unique, duplicate, got str 'several'"),
    (f'cookie = "{SECRET}"\n', "key 'cookie' is refused: a secret does not belong in a config file"),
    ('config = "other.toml"\n', "unknown key 'config'"),
    ("name = \n", "not valid TOML: "),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, cause: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    err = _fails("--name", "n", "--config", str(config))
    assert err.startswith(f"{PREFIX}--config {config}: {cause}"), err
    assert SECRET not in err


async def test_a_config_alone_starts_a_node_and_name_is_required(tmp_path: Path) -> None:
    err = _fails("--name", "n", "--config", "/nonexistent/node.toml")
    assert err == f"{PREFIX}--config /nonexistent/node.toml: cannot read it: No such file or directory", err
    config = tmp_path / "node.toml"
    config.write_text('scope = ["jobs"]\n')
    proc = _start("--config", str(config))
    with _running(proc):
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "the following arguments are required: --name" in err, err
    config.write_text('name = "cfg"\nport = 0\nscope = ["jobs"]\nkeys = "unique"\n')
    proc = _start("--config", str(config))
    with _running(proc):
        node_id = await asyncio.to_thread(_node_id, proc)
        assert node_id.startswith("cfg@127.0.0.1:")
        assert (await _info(node_id))["scopes"] == ["jobs"]
        await _stop(proc)


async def _info(node_id: str) -> dict[str, object]:
    async with Node("t", cookie=COOKIE) as t:
        await t.connect(node_id)
        info: dict[str, object] = await control(node_id, ("info",))
        return info


def test_config_values_parse_like_the_command_line() -> None:
    node = node_options._node_parser(_parser())
    actions = node_options._settable(node)

    def value(key: str, raw: object) -> object:
        return node_options._config_value("--config f", key, raw, actions[key])

    assert value("names", True) == "names" and value("names", False) is None and value("names", "n") == "n"
    assert value("down_after", 2) == 2.0 and type(value("down_after", 2)) is float
    assert value("connect", []) == []
    with pytest.raises(node_options.OptionError, match="'down_after' must be a number, got bool"):
        value("down_after", True)
    assert isinstance(node, argparse.ArgumentParser)


# --------------------------------------------------------------------------- start-up errors

def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        err = _fails("--name", "n", "--port", str(port))
    assert err == f"{PREFIX}--port {port}: address already in use (another socket holds 127.0.0.1:{port})", err


def test_an_address_not_of_this_machine_is_one_line() -> None:
    err = _fails("--name", "n", "--host", "10.255.255.1")
    assert err == f"{PREFIX}--host 10.255.255.1: cannot assign requested address (not an address of this machine)"


def test_an_unknown_host_is_one_line() -> None:
    err = _fails("--name", "n", "--host", "no-such-host.invalid", timeout=40)
    assert err.startswith(f"{PREFIX}--host no-such-host.invalid: unknown host ("), err
