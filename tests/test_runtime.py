"""flows/runtime.py and `dsv3 run` under signals: Ctrl-C stops a training stage within seconds with one line and
exit code 130, SIGTERM too (143); no Prefect server process is left behind; the rerun resumes the stage."""

import io
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from dsv3.config import load_recipe
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from tests.conftest import RECIPES, REPO


def servers_of(runs_dir: Path) -> list[int]:
    """Pids of live processes whose environment names this runs folder's PREFECT_HOME (our Prefect servers)."""
    pids = []
    needle = f"PREFECT_HOME={runs_dir / 'prefect'}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}
STEPS = ["pretrain.steps=400"]


def start_run(runs_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "flows.cli", "run", "--recipe", str(RECIPES / "smoke.yaml"), "--until", "pretrain",
        "--set", *STEPS, "--runs-dir", str(runs_dir),
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, also when this suite
    )  # runs as a background job (`make test &`), whose children inherit SIGINT ignored


def signal_at_first_checkpoint(process: subprocess.Popen, runs_dir: Path, signum: int) -> dict:
    """Wait for the run's first checkpoint, deliver `signum` to its process group as a terminal delivers Ctrl-C,
    and return what the test checks."""
    root = run_root(runs_dir, load_recipe(RECIPES / "smoke.yaml", STEPS))
    checkpoint = root / "pretrain" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    if not checkpoint.exists():
        process.kill()
        return {"checkpoint": False, "output": process.communicate()[0].decode()}
    servers_before = servers_of(runs_dir)
    os.killpg(process.pid, signum)  # as a terminal delivers Ctrl-C: to the whole foreground group
    sent = time.monotonic()
    output = process.communicate(timeout=60)[0].decode()
    seconds = time.monotonic() - sent
    time.sleep(1)
    return {"checkpoint": True, "output": output, "seconds": seconds, "returncode": process.returncode,
            "servers_before": servers_before, "servers_after": servers_of(runs_dir), "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict[int, Future]:
    """One run per signal, both started at once (their Prefect servers and imports overlap on the 2 cores), each in
    its own runs folder and sent its signal at its first checkpoint; a test reads its signal's outcome."""
    runs = {signum: tmp_path_factory.mktemp(f"signal-{signum.name}") / "runs" for signum in SIGNALS}
    processes = {signum: start_run(runs_dir) for signum, runs_dir in runs.items()}  # from this thread (preexec_fn)
    pool = ThreadPoolExecutor(len(SIGNALS))
    yield {signum: pool.submit(signal_at_first_checkpoint, processes[signum], runs[signum], signum) for signum in SIGNALS}
    pool.shutdown(wait=True)
    for process in processes.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", SIGNALS.items())
def test_a_signal_mid_training_stops_fast_and_cleanly(interrupted, signum, code):
    outcome = interrupted[signum].result(timeout=400)
    output = outcome["output"]
    assert outcome["checkpoint"], output[-2000:]
    assert outcome["servers_before"], "the Prefect server should be running"
    assert outcome["seconds"] < 20
    assert outcome["returncode"] == code, output[-2000:]
    assert output.rstrip().splitlines()[-1] == "dsv3: interrupted — rerun the same command to resume"
    assert "Traceback" not in output
    assert outcome["servers_after"] == []
    manifest = read_manifest(outcome["root"] / "pretrain")
    assert manifest.status == "failed" and manifest.failure["kind"] == "interrupted"


def test_lightning_lines_print_once_and_without_advertisements(capfd, tmp_path):
    """Lightning's own console handler and Prefect's (on the root logger) would each print its records."""
    import lightning.pytorch as pl
    from prefect.logging.configuration import setup_logging

    from dsv3.config import PretrainSection
    from dsv3.train.fit import build_trainer
    from dsv3.train.settings import LoopSettings
    from flows.runtime import one_console_for_lightning

    setup_logging()
    one_console_for_lightning()
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):  # an earlier test's dictConfig may
        logging.getLogger(name).disabled = False  # have disabled loggers that existed then (not so in `dsv3 run`)
    # console handlers set up by an earlier test may hold an earlier stderr: read what every one of them prints
    consoles = [
        h for name in ("", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric")
        for h in logging.getLogger(name).handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        and not type(h).__module__.startswith("_pytest")  # pytest's own capture, not a console
    ]
    printed = io.StringIO()
    streams = [h.setStream(printed) for h in consoles]
    rich = [h.console for h in consoles if hasattr(h, "console")]  # Prefect's handler prints through a rich Console
    files = [c.file for c in rich]
    for console in rich:
        console.file = printed
    try:
        build_trainer(LoopSettings.from_pretrain(PretrainSection(steps=1, global_batch_size=2, micro_batch_size=2)), tmp_path, 1, 1, [], False)
        pl.utilities.rank_zero_info("one record")
    finally:
        for handler, stream in zip(consoles, streams, strict=True):
            handler.setStream(stream)
        for console, file in zip(rich, files, strict=True):
            console.file = file
    err = capfd.readouterr().err + printed.getvalue()
    assert err.count("one record") == 1 and "| INFO    | lightning.pytorch.utilities.rank_zero - one record" in err
    assert err.count("GPU available") == 1 and "litlogger" not in err and "Tip" not in err
