"""The reward-model stage (dsv3/stages/reward.py): every preference pair prefers what the rules prefer; on a
smoke-sized model the stage, killed with SIGKILL after a checkpoint, resumes from it, reuses its pairs, logs to
its MLflow run, and ends with a reward model that ranks held-out easy pairs (broken format) far above chance."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dsv3.config import load_recipe
from dsv3.data.chat import CHAT_TEMPLATE
from dsv3.data.math_tasks import generate_problems, is_well_formed
from dsv3.data.tokenizer import save_tokenizer, train_tokenizer
from dsv3.eval.accuracy import answer_is_correct
from dsv3.model import DSV3ForCausalLM, DSV3ForSequenceClassification
from dsv3.stages import reward, run_stage
from dsv3.stages.post_training import last_checkpoint
from dsv3.stages.pretrain import model_config
from dsv3.store.manifest import Manifest, StageKey, hash_outputs, read_manifest, write_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import Tracker
from tests.conftest import RECIPES, REPO

KILLABLE_RUN = """
import sys
from dsv3.config import load_recipe
from dsv3.stages import run_stage
run_stage(sys.argv[1], load_recipe(sys.argv[2], sys.argv[4:]), sys.argv[3])
"""


def smoke(*overrides: str):
    return load_recipe(RECIPES / "smoke.yaml", list(overrides))


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """A save_pretrained folder standing in for the SFT output: the smoke model with random weights and a BPE
    tokenizer trained on math problems, with the chat template."""
    folder = tmp_path_factory.mktemp("sft") / "model"
    problems = generate_problems(300, "train", seed=7)
    tokenizer = train_tokenizer([p["prompt"] + "\n" + p["solution"] for p in problems], vocab_size=512)
    save_tokenizer(tokenizer, folder, CHAT_TEMPLATE)
    torch.manual_seed(0)
    DSV3ForCausalLM(model_config(smoke(), tokenizer)).save_pretrained(folder)
    return folder


def fake_stage(runs_dir: Path, recipe, stage: str, model: Path) -> None:
    """A completed `stage` of the recipe's run whose output `model/` is a copy of `model`."""
    workdir = run_root(runs_dir, recipe) / stage
    shutil.copytree(model, workdir / "model")
    manifest = Manifest(stage, "completed", StageKey("test", {}, "test"), "test")
    manifest.outputs = hash_outputs(workdir, ["model"])
    write_manifest(workdir, manifest)


def kill_after_checkpoint(stage: str, runs_dir: Path, overrides: list[str]) -> int:
    """Run `stage` of the smoke recipe in a subprocess; SIGKILL it once a complete checkpoint exists. Returns
    the checkpoint's step."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", KILLABLE_RUN, stage, str(RECIPES / "smoke.yaml"), str(runs_dir), *overrides]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run_root(runs_dir, smoke(*overrides)) / stage / "checkpoints"
    deadline = time.time() + 180
    while last_checkpoint(checkpoints) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    return int(last_checkpoint(checkpoints).name.rpartition("-")[2])


def test_pairs_prefer_what_the_rules_prefer():
    problems = generate_problems(6, "train", seed=1, steps=2)
    right = problems[0]["solution"]
    samples = [[right, "I think it is \\boxed{-999}."], ["no box here"]]  # a correct sample is not rejected
    pairs, wrong_rate = reward.preference_pairs(problems, samples, random.Random(0))
    assert wrong_rate == pytest.approx(2 / 3)
    kinds = [p["kind"] for p in pairs]
    alternating = ["wrong_answer", "broken_format"] * 2
    assert kinds == ["wrong_answer", "sft_sample", "broken_format", "sft_sample", *alternating]
    by_prompt = {p["prompt"]: p for p in problems}
    for pair in pairs:
        problem = by_prompt[pair["prompt"][0]["content"]]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["prompt"][0]["role"] == "user" and pair["rejected"][0]["role"] == "assistant"
        assert answer_is_correct(chosen, problem["answer"]) and is_well_formed(chosen)
        if pair["kind"] == "broken_format":
            assert not is_well_formed(rejected) and problem["answer"] in rejected
        else:
            assert not answer_is_correct(rejected, problem["answer"])
        if pair["kind"] == "wrong_answer":
            assert is_well_formed(rejected) and rejected.split("\\boxed")[0] == chosen.split("\\boxed")[0]


def test_stage_resumes_after_kill_and_ranks_easy_pairs_above_chance(runs_dir, sft_model):
    overrides = [
        "reward.lr=3e-3",
        "reward.epochs=3",
        "reward.train_problems=48",
        "reward.heldout_problems=32",
        "reward.per_device_batch_size=8",
        "reward.sampled_problems=2",
        "reward.save_steps=2",
    ]
    recipe = smoke(*overrides)
    fake_stage(runs_dir, recipe, "sft", sft_model)
    killed_at = kill_after_checkpoint("reward", runs_dir, overrides)
    workdir = run_root(runs_dir, recipe) / "reward"
    assert read_manifest(workdir).status == "running" and not (workdir / "model").exists()
    pairs_written = (workdir / reward.PAIRS).read_bytes()

    tracker = Tracker(runs_dir, experiment="dsv3-test-reward")
    with tracker.pipeline_run("test"):
        outcome = run_stage("reward", recipe, runs_dir, tracker)
    metrics = outcome.manifest.metrics
    assert outcome.action == "resumed" and outcome.manifest.status == "completed"
    assert (workdir / reward.PAIRS).read_bytes() == pairs_written  # the SFT samples were not drawn again
    assert metrics["resumed_from_step"] >= killed_at > 0
    sampled_wrong = round(2 * 2 * metrics["sft_samples_wrong_rate"])  # 2 problems × 2 samples
    assert metrics["train_pairs"] == 48 + sampled_wrong
    assert metrics["train_steps"] == 3 * -(-metrics["train_pairs"] // 8) > metrics["resumed_from_step"]
    # The easy pairs (a boxed answer against the same answer unboxed), held out, go from about chance to mostly
    # right; 16 pairs and a resumed run that is not bit-exact across CPUs, so the bound leaves room (seen: 0.81–1.0).
    before, after = metrics["heldout_pair_accuracy_before_broken_format"], metrics["heldout_pair_accuracy_broken_format"]
    assert after >= 0.75 and after - before >= 0.25
    assert metrics["heldout_pair_accuracy"] > 0.5
    assert (workdir / reward.PLOT).stat().st_size > 0

    logged = MlflowClient(tracker.uri).get_metric_history(outcome.manifest.mlflow_run_id, "train/accuracy")
    steps = sorted(m.step for m in logged)
    assert steps and steps[0] > metrics["resumed_from_step"] and steps[-1] == metrics["train_steps"]
    model = DSV3ForSequenceClassification.from_pretrained(workdir / "model")
    assert model.config.num_labels == 1


def test_stage_needs_its_section_and_the_sft_model(tmp_path):
    recipe = smoke()
    recipe.reward = None
    with pytest.raises(ValueError, match="no reward section"):
        reward.run(recipe, tmp_path / "reward", {"sft": tmp_path / "sft"})
    with pytest.raises(ValueError, match="run the pipeline up to sft"):
        reward.run(smoke(), tmp_path / "reward", {"sft": tmp_path / "sft"})


def test_the_reward_model_starts_from_the_sft_network_without_a_load_report(sft_model, tmp_path, capfd):
    """transformers reports the LM head left unused and the fresh score head as a warning table on every load;
    the stage checks exactly that itself, and a folder that is not the SFT network still stops it."""
    model = reward.reward_model_from(sft_model)
    sft = DSV3ForCausalLM.from_pretrained(sft_model)
    assert torch.equal(model.model.embed_tokens.weight, sft.model.embed_tokens.weight)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "not sharded" not in err  # nor the TP-plan check a logger level would start
    broken = tmp_path / "broken"
    shutil.copytree(sft_model, broken)
    config = (broken / "config.json").read_text()
    (broken / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ValueError, match=r"missing \[.model\.layers\."):
        reward.reward_model_from(broken)
