"""The SFT stage (dsv3/stages/sft.py) on a smoke-sized model with random weights and a real tokenizer:
through the batch TRL's collator builds, a packed sample's logits and loss equal those of the sample alone;
labels cover exactly the assistant tokens of the chat template; the stage killed with SIGKILL after a
checkpoint resumes from it, logs to its MLflow run and finishes with a loadable model; the resume skips (and
dsv3/stages/post_training.py sets aside) the checkpoints a kill left unreadable."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dsv3.config import RecipeError, load_recipe
from dsv3.data.chat import CHAT_TEMPLATE, format_conversation
from dsv3.data.math_tasks import generate_problems
from dsv3.data.tokenizer import ASSISTANT, EOS, save_tokenizer, train_tokenizer
from dsv3.model import DSV3ForCausalLM
from dsv3.stages import run_stage, sft
from dsv3.stages.post_training import last_checkpoint, resume_checkpoint
from dsv3.stages.pretrain import model_config
from dsv3.store.manifest import Manifest, StageKey, hash_outputs, read_manifest, write_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import Tracker
from tests.conftest import RECIPES, REPO

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is \\boxed{5}."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "That makes \\boxed{8}."},
]

KILLABLE_RUN = """
import sys
from dsv3.config import load_recipe
from dsv3.stages import run_stage
run_stage("sft", load_recipe(sys.argv[1], sys.argv[3:]), sys.argv[2])
"""




def smoke(*overrides: str):
    return load_recipe(RECIPES / "smoke.yaml", list(overrides))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A save_pretrained folder: the smoke model with random weights (large enough that attention across
    documents would change the logits) and a BPE tokenizer trained on math problems, with the chat template."""
    folder = tmp_path_factory.mktemp("pretrained") / "model"
    problems = generate_problems(300, "train", seed=7)
    tokenizer = train_tokenizer([p["prompt"] + "\n" + p["solution"] for p in problems], vocab_size=512)
    save_tokenizer(tokenizer, folder, CHAT_TEMPLATE)
    config = model_config(smoke(), tokenizer)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    DSV3ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trainer(pretrained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    (folder / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    cfg = smoke(f"sft.chat_data=[{folder / 'chat.jsonl'}]").sft
    model, tokenizer = sft.load_model(pretrained, "pretrain")
    rows, dropped = sft.sft_dataset(cfg, 0, tokenizer)
    assert dropped == 0 and len(rows) == cfg.train_problems + 1
    return sft.build_trainer(model, tokenizer, rows, cfg, folder / "checkpoints", seed=0), rows


def documents(batch) -> list[slice]:
    """The packed samples of a padding-free batch (one row): spans between position_ids restarts at 0."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_packed_sample_logits_and_loss_equal_the_sample_alone(trainer):
    trainer, _ = trainer
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1  # padding-free: the batch's rows concatenated into one
    assert "attention_mask" not in batch
    spans = documents(batch)
    assert len(spans) >= 3
    model = trainer.model.eval()
    seen = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))  # the training loss, through TRL's fused LM head
    hook.remove()
    assert torch.equal(seen["position_ids"], batch["position_ids"])  # TRL hands position_ids to the model

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        causal_only = model(input_ids=batch["input_ids"]).logits[0]  # the same row as one document
        alone = [model(input_ids=batch["input_ids"][:, s]).logits[0] for s in spans]
    for span, logits in zip(spans, alone, strict=True):
        assert (packed[span] - logits).abs().max() <= 1e-5
    assert (causal_only[spans[1]] - alone[1]).abs().max() > 1e-3  # the test would see leakage across samples

    labels = batch["labels"][0]
    nll = sum(
        torch.nn.functional.cross_entropy(logits[:-1], labels[s][1:], ignore_index=-100, reduction="sum")
        for s, logits in zip(spans, alone, strict=True)
    )
    assert loss.item() == pytest.approx((nll / (labels[1:] != -100).sum()).item(), abs=1e-5)


def test_labels_cover_exactly_the_assistant_tokens(trainer):
    trainer, rows = trainer
    tokenizer = trainer.processing_class
    assistant, eos = tokenizer.convert_tokens_to_ids([ASSISTANT, EOS])
    conversations = {format_conversation(r["messages"]): r["messages"] for r in rows}
    turns_seen = 0
    for batch in trainer.get_train_dataloader():
        for span in documents(batch):
            ids, labels = batch["input_ids"][0, span].tolist(), batch["labels"][0, span].tolist()
            messages = conversations[tokenizer.decode(ids)]  # each packed sample is one whole conversation
            expected, inside = [], False  # the template's generation span: after <|assistant|>, up to its EOS
            for token in ids:
                expected.append(inside)
                inside = token == assistant or (inside and token != eos)
            assert [label != -100 for label in labels] == expected
            assert all(label == token for label, token in zip(labels, ids, strict=True) if label != -100)
            answers = "".join(m["content"] + EOS for m in messages if m["role"] == "assistant")
            assert (
                tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
                == answers
            )
            turns_seen = max(turns_seen, sum(m["role"] == "assistant" for m in messages))
    assert turns_seen == 2  # the two-turn chat file was checked too


def fake_pretrain_stage(runs_dir: Path, recipe, pretrained: Path) -> None:
    """A completed pretrain stage of the recipe's run whose output is the `pretrained` folder."""
    workdir = run_root(runs_dir, recipe) / "pretrain"
    shutil.copytree(pretrained, workdir / "model")
    manifest = Manifest("pretrain", "completed", StageKey("test", {}, "test"), "test")
    manifest.outputs = hash_outputs(workdir, ["model"])
    write_manifest(workdir, manifest)


def kill_after_checkpoint(runs_dir: Path, overrides: list[str]) -> int:
    """Run the sft stage in a subprocess; SIGKILL it once a complete checkpoint exists. Returns its step."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", KILLABLE_RUN, str(RECIPES / "smoke.yaml"), str(runs_dir), *overrides]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run_root(runs_dir, smoke(*overrides)) / "sft" / sft.CHECKPOINTS
    deadline = time.time() + 120
    while last_checkpoint(checkpoints) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    return int(last_checkpoint(checkpoints).name.rpartition("-")[2])


def test_stage_resumes_after_kill_and_logs_to_its_mlflow_run(runs_dir, pretrained):
    overrides = ["sft.train_problems=100", "sft.log_steps=1", "pipeline.stages=[tokenizer,pretrain,sft]"]
    recipe = smoke(*overrides)
    fake_pretrain_stage(runs_dir, recipe, pretrained)
    killed_at = kill_after_checkpoint(runs_dir, overrides)
    workdir = run_root(runs_dir, recipe) / "sft"
    assert read_manifest(workdir).status == "running" and not (workdir / "model").exists()

    tracker = Tracker(runs_dir, experiment="dsv3-test-sft")
    with tracker.pipeline_run("test"):
        outcome = run_stage("sft", recipe, runs_dir, tracker)
    metrics = outcome.manifest.metrics
    assert outcome.action == "resumed" and outcome.manifest.status == "completed"
    assert metrics["resumed_from_step"] >= killed_at > 0  # continued from the checkpoint, not from step 0
    steps_per_epoch = -(-metrics["packed_rows"] // recipe.sft.per_device_batch_size)
    assert metrics["train_steps"] == recipe.sft.epochs * steps_per_epoch > metrics["resumed_from_step"]
    assert 0 <= metrics["heldout_accuracy"] <= 1 and 0 <= metrics["heldout_format_rate"] <= 1
    assert metrics["train_loss_final"] < metrics["train_loss_first"]
    assert (workdir / sft.LOSS_PLOT).stat().st_size > 0

    logged = MlflowClient(tracker.uri).get_metric_history(outcome.manifest.mlflow_run_id, "train/loss")
    steps = sorted(m.step for m in logged)
    assert steps and steps[0] > metrics["resumed_from_step"] and steps[-1] == metrics["train_steps"]
    model = DSV3ForCausalLM.from_pretrained(workdir / "model")
    assert model.config.vocab_size == DSV3ForCausalLM.from_pretrained(pretrained).config.vocab_size


def test_recipe_and_data_errors(tmp_path):
    with pytest.raises(RecipeError, match="sft.lr_final"):
        smoke("sft.lr_final=1.0")
    assert sft.inputs(smoke("pipeline.stages=[tokenizer,pretrain,sft]")) == ("pretrain",)
    assert sft.inputs(smoke("pipeline.stages=[tokenizer,pretrain,extend,sft]")) == ("extend",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 .*role 'bot'"):
        sft.read_chat_data(bad)
    with pytest.raises(ValueError, match="no file"):
        sft.read_chat_data(tmp_path / "missing.jsonl")


def test_last_checkpoint_skips_incomplete_ones(tmp_path):
    assert last_checkpoint(tmp_path) is None
    for step, state in [(4, '{"global_step": 4}'), (8, None), (12, '{"global_st'), (9, '{"global_step": 9}')]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-9"  # 12 half-written, 8 without its state


def test_resume_checkpoint_sets_newer_unreadable_ones_aside(tmp_path, capsys):
    for step, state in [(4, '{"global_step": 4}'), (8, '{"global_step": 8}'), (12, '{"global_st')]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("*.corrupt-*")] == ["checkpoint-12"]
    assert "set aside" in capsys.readouterr().err


def test_sft_with_zero_learning_rate_fails_its_format_check_and_nothing_after_it_runs(runs_dir, pretrained):
    """An SFT that learns nothing (LR 0) leaves the random model's answers: no \\boxed{}, cut at the limit. With the
    format check at its default the stage is failed with one line, its outputs kept, and reward cannot start."""
    from dsv3.errors import StageFailed
    from dsv3.stages import stage_key
    from dsv3.store.runner import StageInputError

    overrides = ["pipeline.stages=[tokenizer,pretrain,sft,reward]", "sft.lr_peak=0", "sft.lr_final=0", "sft.epochs=1",
                 "checks.sft.min_format_rate=0.5"]  # fmt: skip
    recipe = smoke(*overrides)
    fake_pretrain_stage(runs_dir, recipe, pretrained)
    with pytest.raises(StageFailed, match=r"^stage sft failed its health check checks.sft.min_format_rate: measured 0, needs ≥ 0.5"):
        run_stage("sft", recipe, runs_dir)
    workdir = run_root(runs_dir, recipe) / "sft"
    assert read_manifest(workdir).status == "failed" and (workdir / "model" / "model.safetensors").is_file()
    with pytest.raises(StageInputError, match="needs the output of sft"):
        stage_key("reward", recipe, run_root(runs_dir, recipe))
