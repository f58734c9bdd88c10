"""Private Redis and PostgreSQL servers for tests: each on a free loopback port, in a folder of
its own, so that tests never touch (let alone flush or restart) the machine's own services."""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from devkit.net import free_port


class ServiceUnavailable(RuntimeError):
    """The binaries (or the system user) a server needs are not on this machine."""


def unavailable(what: str, exc: Exception) -> NoReturn:
    """Skip the test for a missing server, or fail it where GRAFT_REQUIRE_SERVICES=1 (CI)."""
    import pytest

    message = f"{what} is not available: {exc}"
    if os.environ.get("GRAFT_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RedisServer:
    """A ``redis-server`` subprocess on 127.0.0.1, keeping its files in ``folder``.

    By default it keeps nothing on disk; ``appendonly=True`` turns on the append-only file
    (fsync every second) in ``folder``, so that its data survives ``stop()``/``start()``.
    The port stays the same across restarts.
    """

    def __init__(
        self,
        folder: Path | str,
        *,
        appendonly: bool = False,
        port: int | None = None,
        binary: str = "redis-server",
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise ServiceUnavailable(f"{binary} is not installed (apt-get install redis-server)")
        self.binary = found
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self._process: subprocess.Popen | None = None
        self._started_once = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def log(self) -> Path:
        return self.folder / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self._port),
            "--dir",
            str(self.folder),
            "--logfile",
            str(self.log),
            "--daemonize",
            "no",
            "--save",
            "",
        ]
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            command += ["--appendonly", "no"]
        return command

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")  # "-LOADING" while it reads its AOF
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        for _ in range(5):
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            atexit.register(self.kill)
            deadline = time.monotonic() + timeout
            while self._process.poll() is None and not self._ping():
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"redis-server on port {self._port} did not answer PING within "
                        f"{timeout:.0f}s:\n{_tail(self.log)}"
                    )
                time.sleep(0.05)
            if self._process.poll() is None:
                self._started_once = True
                return self
            log = _tail(self.log)
            self._process = None
            if self._fixed_port or self._started_once or "in use" not in log:
                raise RuntimeError(f"redis-server on port {self._port} exited:\n{log}")
            self._port = free_port()  # someone took the port in between: pick another
        raise RuntimeError(f"redis-server found no free port:\n{_tail(self.log)}")

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down (SIGTERM: no RDB snapshot; the AOF, if on, is flushed)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        atexit.unregister(self.kill)

    def kill(self) -> None:
        """SIGKILL the server: whatever it had not written yet is gone."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None
        atexit.unregister(self.kill)

    def restart(self) -> RedisServer:
        """Stop and start again, on the same port."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self._port}, folder={str(self.folder)!r})"


def postgres_bindir() -> Path:
    """The folder of ``initdb``/``pg_ctl``: ``pg_config --bindir``, /usr/lib/postgresql/*/bin
    (newest first), or the PATH."""
    candidates: list[Path] = []
    if os.environ.get("GRAFT_PG_BINDIR"):
        candidates.append(Path(os.environ["GRAFT_PG_BINDIR"]))
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)[::-1]
    ]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise ServiceUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found via "
        "pg_config --bindir, /usr/lib/postgresql/*/bin or the PATH "
        "(apt-get install postgresql, or set GRAFT_PG_BINDIR)"
    )


class PostgresCluster:
    """A private PostgreSQL cluster: trust authentication, 127.0.0.1 on a free port, its unix
    sockets in its own folder, ``fsync=off``. The port stays the same across restarts.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user
    and lives in a fresh folder under the system temporary folder (world-traversable, unlike
    pytest's), removed by ``close()``.
    """

    SETTINGS = {
        "listen_addresses": "'127.0.0.1'",
        "max_connections": "200",
        "shared_buffers": "32MB",
        "fsync": "off",
        "logging_collector": "off",
    }

    def __init__(self, port: int | None = None, parent: Path | str | None = None) -> None:
        self.bindir = postgres_bindir()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceUnavailable(
                    "running as root, and there is no 'postgres' user to run PostgreSQL as"
                ) from None
            if shutil.which("runuser") is None:
                raise ServiceUnavailable("running as root, and runuser is not installed")
        self.root = Path(tempfile.mkdtemp(prefix="graft-pg-", dir=parent or tempfile.gettempdir()))
        os.chmod(self.root, 0o755)
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self._started_once = False
        self._running = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The server's SQLAlchemy URL, without a database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._running

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self._user is not None else []
        return subprocess.run(
            [*prefix, *command],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def _initdb(self) -> None:
        self.sockets.mkdir(exist_ok=True)
        if self._user is not None:
            os.chown(self.sockets, self._user.pw_uid, self._user.pw_gid)
        result = self._run(
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        settings = {**self.SETTINGS, "unix_socket_directories": f"'{self.sockets}'"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# a private test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self, timeout: float = 120) -> PostgresCluster:
        """Start the cluster (creating it the first time) and wait until it accepts
        connections."""
        if self._running:
            return self
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        for _ in range(5):
            result = self._run(
                str(self.bindir / "pg_ctl"),
                "start",
                "--pgdata",
                str(self.data),
                "--log",
                str(self.log),
                "--wait",
                "--timeout",
                str(int(timeout)),
                "--options",
                f"-p {self._port}",
                timeout=timeout + 30,
            )
            if result.returncode == 0:
                self._running = self._started_once = True
                atexit.register(self.close)
                return self
            log = _tail(self.log)
            if self._fixed_port or self._started_once or "could not bind" not in log:
                raise RuntimeError(
                    f"PostgreSQL did not start on port {self._port}:\n"
                    f"{result.stdout}\n{result.stderr}\n{log}"
                )
            self._port = free_port()  # someone took the port in between: pick another
        raise RuntimeError(f"PostgreSQL found no free port:\n{_tail(self.log)}")

    def stop(self, mode: str = "fast", timeout: float = 120) -> None:
        """Stop the cluster: ``mode`` is pg_ctl's "smart", "fast" or "immediate" (a crash:
        the next start recovers from the WAL)."""
        if not self._running:
            return
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "stop",
            "--pgdata",
            str(self.data),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(int(timeout)),
            timeout=timeout + 30,
        )
        if result.returncode != 0 and self._postmaster_alive():
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}\n{result.stderr}")
        self._running = False

    def _postmaster_alive(self) -> bool:
        status = self._run(str(self.bindir / "pg_ctl"), "status", "--pgdata", str(self.data))
        return status.returncode == 0

    def restart(self, mode: str = "fast") -> PostgresCluster:
        """Stop and start again, on the same port."""
        self.stop(mode)
        return self.start()

    def _admin(self):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self._port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self) -> str:
        """A fresh, empty, uniquely named database; its full SQLAlchemy URL."""
        name = f"graft_test_{secrets.token_hex(6)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (from ``create_database``), closing its connections."""
        name = url.rsplit("/", 1)[-1].split("?", 1)[0]
        if not re.fullmatch(r"\w+", name) or name in ("postgres", "template0", "template1"):
            raise ValueError(f"not a test database: {url}")
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Stop the cluster (if running) and remove its folder."""
        atexit.unregister(self.close)
        if self._running:
            try:
                self.stop("fast", timeout=60)
            except (RuntimeError, subprocess.SubprocessError):
                self.stop("immediate", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresCluster(port={self._port}, root={str(self.root)!r})"
