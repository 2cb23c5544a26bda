"""`dsv3 serve` (make serve): the pipeline as a Prefect deployment. A real Prefect server, the serve process, and
a run started through Prefect's client the way the UI's Run button starts it; the launch form offers the stages as
a choice for `until`, and the run completes, is named after the recipe and variant, tagged, and writes its stage."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dsv3.config import STAGE_ORDER, load_recipe
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from tests.conftest import RECIPES, REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_run_started_from_the_deployment_completes(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port, runs = free_port(), tmp_path / "runs"
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    server = subprocess.Popen(prefect, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    serve = None
    try:
        # started beside the server, as `make serve` starts them: `dsv3 serve` waits for the server itself; it looks
        # for scheduled runs every second (Prefect's default: 10), and so does run_deployment (5)
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--runs-dir", str(runs)],
            env=env | {"PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: _healthy(api), 180, "the Prefect server")
        with temporary_settings({PREFECT_API_URL: api}):
            wait_for(lambda: _deployed(get_client), 120, "the deployment")
            with get_client(sync_client=True) as client:
                schema = client.read_deployment_by_name("dsv3-pipeline/dsv3").parameter_openapi_schema
            until = schema["properties"]["until"]  # what the launch form draws: a dropdown of the stages
            assert {"enum": list(STAGE_ORDER), "type": "string"} in until["anyOf"], until
            parameters = {"recipe_path": str(RECIPES / "smoke.yaml"), "until": "tokenizer", "runs_dir": str(runs)}
            flow_run = run_deployment("dsv3-pipeline/dsv3", parameters=parameters, timeout=240, poll_interval=1)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.name.startswith("smoke-base-") and {"dsv3", "smoke"} <= set(flow_run.tags)
        stage = run_root(runs, load_recipe(RECIPES / "smoke.yaml")) / "tokenizer"
        assert read_manifest(stage).status == "completed"
    finally:
        for process in (serve, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _deployed(get_client) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name("dsv3-pipeline/dsv3")
            return True
        except Exception:  # noqa: BLE001 - not registered yet
            return False
