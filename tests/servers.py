"""Throwaway PostgreSQL and MLflow servers: the engines a sweep over several hosts runs on.

What: ``postgres`` (session) starts a PostgreSQL cluster of its own on a free loopback port
and hands out fresh databases (``postgres.new_database()`` -> a SQLAlchemy URL that Optuna's
``RDBStorage`` and ``mlflow server --backend-store-uri`` both accept);
``postgres_url`` is one fresh database per test; ``mlflow_server`` (session) is
``mlflow server`` as users start it, on its own PostgreSQL database with an artifact
directory, ready once ``/health`` answers. Both stop at the end of the session, also when a
test fails or the run is interrupted (pytest tears session fixtures down on Ctrl-C; an
``atexit`` hook covers an interpreter that exits otherwise).

Why not pytest-postgresql: PostgreSQL refuses to run as root and CI runs as root.
pytest-postgresql starts ``pg_ctl`` as the current user and has no option to switch
(its issues #341 and #455 asked for one), so here ``initdb``/``pg_ctl`` run through
``runuser -u postgres`` when we are root, in a data directory under /tmp that the postgres
user owns (pytest's own tmp directories are private to root). The binaries are found on
``PATH`` or in Debian's ``/usr/lib/postgresql/<version>/bin``.

Speed (2 CPU cores, light to heavy load): the cluster is up in 0.7-1.8 s (``initdb``
without fsync, C locale); ``mlflow server`` needs 5-13 s (its imports and schema migrations;
19-22 s with its default 4 workers and job execution), so it is started only when a test asks
for it, once per session, with one worker process and no job execution.

URL form: ``postgresql+psycopg://postgres@127.0.0.1:PORT/NAME``: psycopg 3 (the project's
driver) named explicitly, which SQLAlchemy 2.0 and 2.1 both read the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER = "postgres"


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's layout)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor in "
        "/usr/lib/postgresql/*/bin: install the server (Debian/Ubuntu: apt-get install "
        "postgresql) to run the multi-host tests"
    )


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL will not run as root: as root, run ``cmd`` as the postgres user."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_USER, "--", *cmd]
    return ["su", PG_USER, "-s", "/bin/sh", "-c", subprocess.list2cmdline(cmd)]


class PostgresCluster:
    """One throwaway PostgreSQL cluster; ``stop()`` ends it and removes its files."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir, self.root, self.port = bin_dir, root, port
        self.data = root / "data"
        self.log = root / "server.log"
        self.startup_s = float("nan")
        self._names = itertools.count()
        self._running = False

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(cls, attempts: int = 3) -> PostgresCluster:
        """initdb + pg_ctl start on a free port (another port if that one was taken)."""
        bin_dir = find_pg_bin()
        last_error: Exception | None = None
        for _ in range(attempts):
            root = Path(tempfile.mkdtemp(prefix="zsharp-pg-"))
            if os.geteuid() == 0:
                entry = pwd.getpwnam(PG_USER)
                os.chown(root, entry.pw_uid, entry.pw_gid)
            cluster = cls(bin_dir, root, free_port())
            try:
                cluster._boot()
                return cluster
            except (subprocess.CalledProcessError, TimeoutError) as exc:
                last_error = exc
                cluster.stop()
        raise RuntimeError(f"PostgreSQL did not start after {attempts} attempts") from last_error

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = _as_server_user([str(self.bin_dir / args[0]), *args[1:]])
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=self.root)

    def _boot(self) -> None:
        started = time.perf_counter()
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._running = True
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log),
                  "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL is not listening on {self.port}: {self.log}")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - started
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the server at once (no checkpoint: the data is thrown away) and delete it."""
        if self._running:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                          timeout=60)
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)

    # --- databases -------------------------------------------------------------------------
    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` (for Optuna and ``mlflow server``)."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs):
        """A psycopg connection to ``database`` (to look at what a store wrote)."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname=database,
                               **kwargs)

    def create_database(self, name: str) -> str:
        from psycopg import sql

        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def new_database(self, prefix: str = "db") -> str:
        """A fresh, empty database; returns its URL."""
        return self.create_database(f"{prefix}_{next(self._names)}_{uuid.uuid4().hex[:6]}")


class MlflowServer:
    """``mlflow server`` in its own process group; ``stop()`` ends it and its workers."""

    def __init__(self, backend_uri: str, artifacts: Path, port: int, log: Path) -> None:
        self.backend_uri, self.artifacts, self.port, self.log_path = (
            backend_uri, artifacts, port, log,
        )
        self.uri = f"http://127.0.0.1:{port}"
        self.startup_s = float("nan")
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def command(backend_uri: str, artifacts: Path, port: int, workers: int = 1) -> list[str]:
        cli = Path(sys.executable).with_name("mlflow")
        head = [str(cli)] if cli.exists() else [sys.executable, "-m", "mlflow"]
        return [*head, "server", "--backend-store-uri", backend_uri,
                "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers)]

    def start(self, timeout: float = 180) -> MlflowServer:
        started = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No job-execution workers (GenAI jobs; none here): fewer processes to start.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(self.backend_uri, self.artifacts, self.port), stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server not healthy after {timeout} s:\n"
                                   + self.log_tail())
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - started
        return self

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        """SIGKILL to the whole process group (uvicorn and its workers): the server is
        throwaway, and a graceful uvicorn shutdown costs seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the session; ``.new_database()`` gives fresh databases."""
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database for one test, as a SQLAlchemy URL."""
    return postgres.new_database("test")


@pytest.fixture(scope="session")
def mlflow_server(
    postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` on its own PostgreSQL database with a local artifact directory."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(
        postgres.new_database("mlflow"), root / "artifacts", free_port(), root / "server.log"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
