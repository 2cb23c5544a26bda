"""Prefect start-up for the flows: its home under the runs folder and an API server that outlives Ctrl-C.

Without PREFECT_API_URL Prefect starts a temporary server in a child process of the same process group, so the
Ctrl-C meant for the pipeline kills the server first and the flow then spends minutes retrying the connection.
`prefect_api` starts the same server (uvicorn on Prefect's app factory, UI off, Prefect's ephemeral settings) in
its own session instead: Ctrl-C reaches only the pipeline, which records the interruption and stops the server
on its way out; the server also dies with its parent (PR_SET_PDEATHSIG), so a SIGKILLed pipeline leaves no
server behind. Links to flow runs ("View at ...", the MLflow tag prefect.flow_run_url) point at the UI address of
`make ui` rather than at that short-lived server. With PREFECT_API_URL set (`make ui`, `make serve`), the flows use that server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL, temporary_settings

UI_URL = "http://127.0.0.1:4200"  # where `make ui` / `make serve` show the same runs (DSV3_PREFECT_UI to change)
STARTUP_TIMEOUT_S = 180  # a busy 2-core laptop can take over a minute to migrate a fresh database
SERVER_LOG = "prefect-server.log"
# Runs in the server's process before it becomes uvicorn: die with the parent (Linux), then exec.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\nexcept (OSError, AttributeError):\n    pass\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def prefect_home(runs_dir: Path) -> Path:
    """PREFECT_HOME = runs/prefect (set for this process and its children), so `make ui` shows the same runs."""
    home = Path(os.environ.get("PREFECT_HOME") or Path(runs_dir).resolve() / "prefect")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)
    return home


@contextmanager
def prefect_api(runs_dir: Path) -> Iterator[str]:
    """The Prefect API URL the flows report to while the context is open (a server of ours, or PREFECT_API_URL)."""
    home = prefect_home(runs_dir)
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = _free_port()
    log = open(home / SERVER_LOG, "ab")  # noqa: SIM115 (kept open for the server's lifetime)
    command = [
        sys.executable, "-c", _LAUNCH, "-m", "uvicorn",
        "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_until_healthy(server, url, home / SERVER_LOG)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_UI_URL: ui_url(), PREFECT_HOME: str(home)}):
            _quiet_empty_tracebacks()
            one_console_for_lightning()
            try:
                yield url
            finally:
                _flush_to_server()
    finally:
        _stop(server)
        log.close()


def ui_url() -> str:
    """The Prefect UI that links point at: our server is gone when the run ends, `make ui` shows its runs later."""
    return os.environ.get("DSV3_PREFECT_UI", UI_URL).rstrip("/")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, seconds: float = STARTUP_TIMEOUT_S) -> None:
    """Wait for a Prefect server someone else started (make serve starts it beside `dsv3 serve`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url.rstrip('/')}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise ValueError(f"no Prefect server answers at {url} after {seconds:.0f} s: start one (make serve does)")


def _wait_until_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {server.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the Prefect server did not answer within {STARTUP_TIMEOUT_S} s; see {log}")


def _flush_to_server() -> None:
    """Send the logs and events still queued while the server is up (else they fail at interpreter exit)."""
    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - a lost log line must not hide the pipeline's own outcome
            pass


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 10 s."""
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returns a Failed state with exc_info but no exception ("NoneType: None")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def one_console_for_lightning() -> None:
    """Lightning's loggers get console handlers of their own on import (`lightning`, and `lightning.pytorch` /
    `lightning.fabric` when the root logger had none yet) and still propagate to the root logger, where Prefect's
    console handler prints the same record again: keep Prefect's (one line, timestamped, like the flow's)."""
    import lightning.pytorch  # noqa: F401 - adds those handlers on import

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def _quiet_empty_tracebacks() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoEmptyTraceback) for f in logger.filters):
            logger.addFilter(_NoEmptyTraceback())
