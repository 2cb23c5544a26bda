"""The stage contract: skip when the manifest matches, rerun when outputs are missing or corrupt,
rerun when the recipe changes, resume a stage killed part-way from its own checkpoint."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import types
from dataclasses import replace

import pytest

import dsv3.stages
from dsv3.config import load_recipe
from dsv3.errors import StageFailed, TrainingDiverged
from dsv3.stages import get_stage, run_stage
from dsv3.store import Stage, StageResult
from dsv3.store import runner as runner_module
from dsv3.store.manifest import MANIFEST_NAME, read_manifest
from dsv3.store.runner import STAGE_LOG, StageInputError
from dsv3.store.runs import run_root
from tests.conftest import RECIPES

COUNTING_STAGE = textwrap.dedent(
    '''
    """A stage of N steps that checkpoints after each step and can be told to die part-way."""
    import json, os, signal
    from dsv3.store import Stage, StageResult, metric
    SECTIONS = ("data",)
    CALLS = []

    def run(recipe, workdir, inputs):
        CALLS.append(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt = workdir / "ckpt.json"
        state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "total": 0, "resumed_at": None}
        if state["step"]:
            state["resumed_at"] = state["step"]
        while state["step"] < 10:
            state["step"] += 1
            state["total"] += state["step"] * recipe.data.seq_len
            if state["step"] == int(os.environ.get("DIVERGE_AT_STEP", "0")):
                from dsv3.errors import TrainingDiverged
                raise TrainingDiverged(f"training diverged at step {state['step']}")
            ckpt.write_text(json.dumps(state))
            if state["step"] == int(os.environ.get("DIE_AT_STEP", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
        (workdir / "result.txt").write_text(str(state["total"]))
        return StageResult(outputs=["result.txt"], metrics={"total": state["total"], "resumed_at": state["resumed_at"] or 0})

    STAGE = Stage(name="tokenizer", run=run, sections=SECTIONS, checks={"min_bytes_per_token": metric("bytes_per_token_validation")})
    '''
)


def _stage_module(tmp_path):
    path = tmp_path / "counting_stage.py"
    path.write_text(COUNTING_STAGE)
    module = types.ModuleType("counting_stage")
    exec(compile(COUNTING_STAGE, str(path), "exec"), module.__dict__)
    module.__file__ = str(path)
    return module


def declared(module) -> Stage:
    """The counting module as the tokenizer stage, read afresh at each call (a test edits its run, sections and data
    files); its run a lambda of this file, so that the key's code stays the same when a test swaps the run."""
    return replace(
        module.STAGE, run=lambda *a: module.run(*a), sections=module.SECTIONS, tunable=getattr(module, "TUNABLE", ()),
        data_files=getattr(module, "data_files", None),
    )


@pytest.fixture
def stage(tmp_path, monkeypatch):
    module = _stage_module(tmp_path)
    monkeypatch.setattr(dsv3.stages, "get_stage", lambda name: declared(module))
    return module


def test_runs_then_skips(stage, runs_dir):
    recipe = load_recipe(RECIPES / "smoke.yaml")
    first = run_stage("tokenizer", recipe, runs_dir)
    assert first.action == "ran" and first.manifest.status == "completed"
    mtime = (first.workdir / "result.txt").stat().st_mtime_ns
    second = run_stage("tokenizer", recipe, runs_dir)
    assert second.action == "skipped" and len(stage.CALLS) == 1
    assert (first.workdir / "result.txt").stat().st_mtime_ns == mtime  # nothing rewritten
    assert second.manifest.metrics["total"] == sum(range(1, 11)) * 64


def test_missing_or_corrupt_output_is_rerun(stage, runs_dir):
    recipe = load_recipe(RECIPES / "smoke.yaml")
    outcome = run_stage("tokenizer", recipe, runs_dir)
    (outcome.workdir / "result.txt").write_text("tampered")
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"
    (outcome.workdir / "result.txt").unlink()
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"
    (outcome.workdir / MANIFEST_NAME).write_text("{not json")
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"
    assert len(stage.CALLS) == 4


def test_changed_recipe_section_reruns_from_scratch(stage, runs_dir):
    run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml"), runs_dir)
    changed = run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml", ["data.seq_len=32"]), runs_dir)
    assert changed.action == "ran" and changed.manifest.metrics["total"] == sum(range(1, 11)) * 32
    assert changed.manifest.metrics["resumed_at"] == 0
    untouched = run_stage(
        "tokenizer",
        load_recipe(RECIPES / "smoke.yaml", ["data.seq_len=32", "model.hidden_size=64"]),
        runs_dir,
    )
    assert untouched.action == "skipped"  # the model section is not one of this stage's sections


def test_killed_stage_resumes_from_its_checkpoint(tmp_path, runs_dir):
    """SIGKILL at step 4 of 10 in a child process; rerunning resumes at step 4 and reaches the same total."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {str(tmp_path)!r})
        import counting_stage
        from dsv3.config import load_recipe
        from dsv3.store import runner
        runner.run_stage(counting_stage.STAGE, load_recipe({str(RECIPES / "smoke.yaml")!r}), {str(runs_dir)!r})
    """)
    )
    (tmp_path / "counting_stage.py").write_text(COUNTING_STAGE)
    env = os.environ | {"DIE_AT_STEP": "4"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    workdir = run_root(runs_dir, load_recipe(RECIPES / "smoke.yaml")) / "tokenizer"
    assert read_manifest(workdir).status == "running"
    assert json.loads((workdir / "ckpt.json").read_text())["step"] == 4

    env = os.environ | {"DIE_AT_STEP": "0"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(workdir)
    assert manifest.status == "completed" and manifest.attempts == 2
    assert manifest.metrics["resumed_at"] == 4
    assert manifest.metrics["total"] == sum(range(1, 11)) * 64  # nothing lost, nothing counted twice


def test_failed_stage_is_marked_failed(stage, runs_dir, monkeypatch):
    recipe = load_recipe(RECIPES / "smoke.yaml")
    monkeypatch.setattr(stage, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_stage("tokenizer", recipe, runs_dir)
    assert read_manifest(run_root(runs_dir, recipe) / "tokenizer").status == "failed"


def test_stage_without_its_input_is_refused(runs_dir):
    recipe = load_recipe(RECIPES / "smoke.yaml")
    downstream = Stage(name="pretrain", run=lambda *a: StageResult([]), sections=("model",), inputs=("tokenizer",))
    with pytest.raises(StageInputError, match="needs the output of tokenizer"):
        runner_module.run_stage(downstream, recipe, runs_dir)


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage 'pretrian'"):
        get_stage("pretrian")


def test_stage_code_covers_the_library_it_uses():
    import dsv3.stages.pretrain as pretrain
    import dsv3.stages.tokenizer as tokenizer
    from dsv3.store.keyed import code_files

    def names(module):
        return {f"{p.parent.name}/{p.name}" for p in code_files(module)}

    assert {"stages/tokenizer.py", "data/tokenizer.py", "data/fim.py"} <= names(tokenizer)
    assert not any(n.startswith("model/") for n in names(tokenizer))
    assert {"stages/pretrain.py", "model/moe.py", "model/mtp.py", "train/schedules.py", "train/module.py"} <= names(pretrain)
    assert "stages/tokenizer.py" not in names(pretrain) and "store/runner.py" not in names(pretrain)


# ------------------------------------------------------------------------------------ health checks, data, divergence


def test_failed_check_fails_the_stage_keeps_outputs_and_is_rejudged_not_rerun(stage, runs_dir, monkeypatch):
    """The counting stage stands in for the tokenizer; its bytes per token is below the recipe's threshold."""
    real_run = stage.run
    monkeypatch.setattr(
        stage, "run", lambda *a: (r := real_run(*a), r.metrics.update(bytes_per_token_validation=1.0), r)[-1]
    )
    recipe = load_recipe(RECIPES / "smoke.yaml", ["checks.tokenizer.min_bytes_per_token=1.5"])
    with pytest.raises(StageFailed, match=r"stage tokenizer failed its health check checks.tokenizer.min_bytes_per_token: measured 1, needs ≥ 1.5"):
        run_stage("tokenizer", recipe, runs_dir)
    workdir = run_root(runs_dir, recipe) / "tokenizer"
    manifest = read_manifest(workdir)
    assert manifest.status == "failed" and manifest.failure["kind"] == "check"
    assert (workdir / "result.txt").is_file() and manifest.outputs  # kept for inspection
    downstream = Stage(name="pretrain", run=stage.run, sections=("model",), inputs=("tokenizer",))
    with pytest.raises(StageInputError, match="needs the output of tokenizer"):  # nothing after it runs
        runner_module.stage_key(downstream, recipe, run_root(runs_dir, recipe))

    with pytest.raises(StageFailed):  # same recipe: the same verdict, without training again
        run_stage("tokenizer", recipe, runs_dir)
    relaxed = run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml", ["checks.tokenizer.min_bytes_per_token=0.9"]), runs_dir)
    assert relaxed.action == "rejudged" and relaxed.manifest.status == "completed"
    assert len(stage.CALLS) == 1

    ignored = run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml", ["checks.enforce=false"]), runs_dir)
    assert ignored.manifest.status == "completed"
    assert [c["name"] for c in ignored.manifest.failed_checks] == ["checks.tokenizer.min_bytes_per_token"]
    assert len(stage.CALLS) == 1


def test_editing_a_data_file_reruns_the_stage(stage, runs_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text")
    stage.data_files = lambda recipe: [str(corpus)]
    recipe = load_recipe(RECIPES / "smoke.yaml")
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"
    assert run_stage("tokenizer", recipe, runs_dir).action == "skipped"
    corpus.write_text("some other text")
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"
    assert len(stage.CALLS) == 2


def test_a_diverged_stage_resumes_after_a_fix_to_its_tunable_section(stage, runs_dir, monkeypatch):
    """Divergence at step 6 after checkpointing each step; a changed model section (here: tunable) resumes from
    the checkpoint, a changed data section (not tunable) starts over."""
    stage.SECTIONS, stage.TUNABLE = ("data", "model"), ("model",)
    real_run = stage.run

    def diverging(recipe, workdir, inputs):
        if recipe.model.hidden_size == 32:
            monkeypatch.setenv("DIVERGE_AT_STEP", "6")
        else:
            monkeypatch.delenv("DIVERGE_AT_STEP", raising=False)
        return real_run(recipe, workdir, inputs)

    monkeypatch.setattr(stage, "run", diverging)
    with pytest.raises(TrainingDiverged, match="step 6"):
        run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml"), runs_dir)
    assert read_manifest(run_root(runs_dir, load_recipe(RECIPES / "smoke.yaml")) / "tokenizer").failure["kind"] == "diverged"
    fixed = run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml", ["model.hidden_size=48"]), runs_dir)
    assert fixed.action == "resumed" and fixed.manifest.metrics["resumed_at"] == 5

    with pytest.raises(TrainingDiverged):
        run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml", ["name=other"]), runs_dir)
    fresh = run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml", ["name=other", "data.seq_len=32", "model.hidden_size=48"]), runs_dir)
    assert fresh.action == "ran" and fresh.manifest.metrics["resumed_at"] == 0


def test_interrupt_and_full_disk_are_recorded_and_resume(stage, runs_dir, monkeypatch):
    recipe = load_recipe(RECIPES / "smoke.yaml")
    real_run = stage.run
    for error, kind in ((KeyboardInterrupt(), "interrupted"), (OSError(errno.ENOSPC, "No space left on device"), "disk")):
        monkeypatch.setattr(stage, "run", lambda *a, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(type(error)):
            run_stage("tokenizer", recipe, runs_dir)
        manifest = read_manifest(run_root(runs_dir, recipe) / "tokenizer")
        assert manifest.status == "failed" and manifest.failure["kind"] == kind
    monkeypatch.setattr(stage, "run", real_run)
    resumed = run_stage("tokenizer", recipe, runs_dir)
    assert resumed.action == "resumed" and resumed.manifest.attempts == 3


def test_an_edited_local_corpus_reruns_the_real_tokenizer_stage(runs_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * 40)
    recipe = load_recipe(
        RECIPES / "smoke.yaml",
        ["data.source=local", f"data.paths=[{corpus}]", "data.mixture=null", "tokenizer.vocab_size=300", "checks.tokenizer.min_bytes_per_token=1.0"],
    )
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"
    assert run_stage("tokenizer", recipe, runs_dir).action == "skipped"
    (corpus / "doc3.txt").write_text("class Edited:\n    pass\n" * 40)
    assert run_stage("tokenizer", recipe, runs_dir).action == "ran"


def test_a_stages_log_records_are_kept_in_its_folder(stage, runs_dir, monkeypatch):
    run = stage.run

    def logging_run(recipe, workdir, inputs):
        logging.getLogger("dsv3.train").warning("step 10/10: loss 1.25")
        return run(recipe, workdir, inputs)

    monkeypatch.setattr(stage, "run", logging_run)
    handlers = list(logging.getLogger().handlers)
    outcome = run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml"), runs_dir)
    assert "WARNING dsv3.train: step 10/10: loss 1.25" in (outcome.workdir / STAGE_LOG).read_text()
    assert logging.getLogger().handlers == handlers  # the file is let go when the stage ends


def test_a_stage_draws_no_library_bars_but_keeps_its_training_bar(stage, runs_dir, monkeypatch, capfd):
    """datasets (map, save_to_disk: TRL's dataset preparation too) and transformers (loading weights, writing the
    shards of every checkpoint) each drew a bar per call; tqdm itself, which the training bars use, still draws."""
    import datasets
    import tqdm
    from transformers.utils import logging as transformers_logging

    run = stage.run

    def drawing_run(recipe, workdir, inputs):
        rows = datasets.Dataset.from_dict({"x": list(range(4))}).map(lambda r: r, desc="tokenizing")
        rows.save_to_disk(str(workdir.parent / "rows"))
        for _ in transformers_logging.tqdm(range(2), desc="Writing model shards"):
            pass
        for _ in tqdm.tqdm(range(2), desc="Epoch 0"):
            pass
        return run(recipe, workdir, inputs)

    monkeypatch.setattr(stage, "run", drawing_run)
    before = transformers_logging.is_progress_bar_enabled(), datasets.are_progress_bars_disabled()
    run_stage("tokenizer", load_recipe(RECIPES / "smoke.yaml"), runs_dir)
    err = capfd.readouterr().err
    assert "Epoch 0" in err
    assert "tokenizing" not in err and "Saving the dataset" not in err and "Writing model shards" not in err
    # the libraries' switches are left as the stage found them (an earlier in-process `dsv3 generate` turns
    # transformers' bar off for good, so "as found" is the contract, not "on")
    assert (transformers_logging.is_progress_bar_enabled(), datasets.are_progress_bars_disabled()) == before


def test_post_training_pins_memory_only_for_an_accelerator(tmp_path):
    """torch warns at every epoch's loader when memory pinning is asked for without an accelerator."""
    import warnings

    import torch
    from transformers import TrainingArguments

    from dsv3.stages.post_training import shared_arguments

    args = TrainingArguments(**shared_arguments("sft", tmp_path, 0, 10, 1))
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
    loader = torch.utils.data.DataLoader(list(range(4)), pin_memory=args.dataloader_pin_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(iter(loader))


def test_the_store_imports_no_stage_and_nothing_in_dsv3_imports_flows():
    """docs/design.md, "Layers": the store runs the declarations it is handed."""
    probe = (
        "import sys, pkgutil, importlib, dsv3.store\n"
        "for m in pkgutil.iter_modules(dsv3.store.__path__): importlib.import_module(f'dsv3.store.{m.name}')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dsv3.stages', 'flows'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=RECIPES.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    sources = list((RECIPES.parent / "dsv3").rglob("*.py"))
    assert not [p for p in sources if "from flows" in p.read_text() or "import flows" in p.read_text()]
