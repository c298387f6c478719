"""Processes the load and durability scripts drive: the service, the bare floor app, and a
private, throwaway PostgreSQL cluster.

The private cluster exists so that stopping or restarting PostgreSQL under load (and
benchmarking it) never touches the shared server on 5432 that other test runs use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
PG_BIN = Path(os.environ.get("BANDIT_PG_BIN", "/usr/lib/postgresql/15/bin"))

# The shapes' context has a flat part (namespace c) and a nested "user" object (namespace
# u); candidate features are namespace a; slot features s. Same policy as engine_latency.
POLICY = """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.1 -q ua -q sa"
reward_min = -1
reward_max = 1
reward_window_seconds = 3600
"""


_TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn workers, PostgreSQL backends)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            todo += [int(c) for c in children]
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each live process (Linux ``/proc``)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, path: str, timeout: float = 60.0, proc: subprocess.Popen | None = None
) -> None:
    """Wait until ``GET path`` answers 200 (the process may still be importing)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if client.get(path).status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"{url}{path} not ready after {timeout:.0f} s")


@dataclass
class Server:
    """A uvicorn process (and its workers) on a loopback port."""

    name: str
    url: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """Children of the uvicorn supervisor (the serving workers), if any."""
        try:
            out = subprocess.run(
                ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
            ).stdout
        except FileNotFoundError:
            return []
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def kill9(self) -> None:
        """SIGKILL the supervisor and every worker: no shutdown hook runs anywhere."""
        pids = [*self.worker_pids(), self.proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def write_policies(folder: Path, policy: str = POLICY) -> Path:
    policies = folder / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    (policies / "default.toml").write_text(policy)
    return policies


def start_service(
    name: str,
    database_url: str,
    policies_dir: Path,
    workers: int = 2,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
    source: Path | None = None,
) -> Server:
    """``bandit-service serve --migrate`` (trainer off: decisions are what is measured).

    ``source``: serve the ``bandit_service`` package found in that folder instead (e.g. an
    older commit exported with ``git archive``), to compare two versions in one run."""
    port = port or free_port()
    env = {
        **os.environ,
        "BANDIT_DATABASE_URL": database_url,
        "BANDIT_POLICIES_DIR": str(policies_dir),
        "BANDIT_TRAINER": "off",
        **(extra_env or {}),
    }
    cli = [str(Path(sys.executable).parent / "bandit-service")]
    cwd = None
    if source is not None:
        env["PYTHONPATH"] = str(source)  # found before the editable install's finder
        cli = [sys.executable, "-m", "bandit_service.cli"]
        # ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH:
        # run from the repository, it served the *current* package as "base".
        cwd = source
    proc = subprocess.Popen(
        [
            *cli,
            "serve",
            "--migrate",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=cwd,
    )
    server = Server(name, f"http://127.0.0.1:{port}", proc, env)
    try:
        wait_http(server.url, "/readyz", proc=proc)
    except BaseException:
        server.stop()
        raise
    return server


def start_floor(workers: int = 2) -> Server:
    """The bare FastAPI app (``_floor_app``): same routes, no work. The floor of the table."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "_floor_app:app",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=BENCH_DIR,
    )
    server = Server("floor", f"http://127.0.0.1:{port}", proc)
    try:
        wait_http(server.url, "/healthz", proc=proc)
    except BaseException:
        server.stop()
        raise
    return server


class PrivatePostgres:
    """A throwaway PostgreSQL cluster in a temporary folder, on its own port.

    ``stop()``/``start()`` it freely: nothing else uses it. Durability settings are the
    server defaults (fsync on, synchronous_commit on), as in production.
    """

    def __init__(self, port: int | None = None) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL binaries not found in {PG_BIN} (set BANDIT_PG_BIN)")
        self.port = port or free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="bandit-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: hand the folder over
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
            "-E", "UTF8",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.folder}'\nmax_connections = 200\n"
            )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        command = [str(PG_BIN / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(port: int | None = None) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(port)
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()
