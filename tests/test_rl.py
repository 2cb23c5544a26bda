"""The GRPO stage (dsv3/stages/rl.py) on a smoke-sized model with random weights: TRL's advantages are the
weighted rewards normalised within each group of G answers to one prompt (docs/paper.md, "Post-training"); the
reference model is the SFT model reloaded by path; the k3 KL is zero at the first step, where policy and
reference coincide; the stage killed with SIGKILL after a checkpoint resumes from it, logs each reward to its
MLflow run and reports SFT and RL side by side."""

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from dsv3.config import RecipeError
from dsv3.model import DSV3ForCausalLM, DSV3ForSequenceClassification
from dsv3.stages import rl, run_stage
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import Tracker
from tests.test_reward_stage import fake_stage, kill_after_checkpoint, sft_model, smoke  # noqa: F401


@pytest.fixture(scope="module")
def reward_model(sft_model, tmp_path_factory):  # noqa: F811
    """The SFT stand-in with a fresh scalar head, saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("reward") / "model"
    torch.manual_seed(1)
    DSV3ForSequenceClassification.from_pretrained(sft_model, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(sft_model).save_pretrained(folder)
    return folder


def test_advantages_are_group_normalised_rewards_and_kl_starts_at_zero(sft_model, reward_model, tmp_path):  # noqa: F811
    cfg = smoke("rl.steps=1", "rl.num_generations=4", "rl.prompts_per_step=3", "rl.format_weight=0.5").rl
    policy = DSV3ForCausalLM.from_pretrained(sft_model)
    tokenizer = AutoTokenizer.from_pretrained(sft_model, padding_side="left")
    trainer = rl.build_trainer(
        policy,
        tokenizer,
        DSV3ForSequenceClassification.from_pretrained(reward_model),
        AutoTokenizer.from_pretrained(reward_model),
        cfg,
        tmp_path,
        seed=0,
    )
    reference = trainer.ref_model  # reloaded by TRL from the policy's path: the same weights, another module
    assert isinstance(reference, DSV3ForCausalLM) and reference is not policy
    for (name, p), q in zip(policy.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    trainer.train()

    G, weights = cfg.num_generations, [cfg.correctness_weight, cfg.format_weight, cfg.reward_model_weight]
    per_reward = torch.tensor([list(trainer._logs["rewards"][name]) for name in rl.REWARD_NAMES])  # (3, B·G)
    total = (torch.tensor(weights)[:, None] * per_reward).sum(0).view(-1, G)  # (B, G)
    advantages = torch.tensor(list(trainer._logs["advantages"])).view(-1, G)  # (B, G)
    prompts = [str(p) for p in trainer._logs["prompt"]]
    assert advantages.shape == (cfg.prompts_per_step, G)
    assert all(len(set(prompts[i * G : (i + 1) * G])) == 1 for i in range(cfg.prompts_per_step))  # a group
    assert len(set(prompts)) == cfg.prompts_per_step
    assert total.std(dim=1).min() > 0  # the reward model's score varies within every group
    # A_i = (r_i − mean r) / (std r + 1e-4), std with n − 1 as TRL takes it
    expected = (total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(advantages, expected, atol=1e-4)
    assert torch.allclose(advantages.mean(1), torch.zeros(cfg.prompts_per_step), atol=1e-5)

    (logged,) = [r for r in trainer.state.log_history if "kl" in r]
    assert logged["kl"] == pytest.approx(0.0, abs=1e-6)  # one update from the reference: π = π_ref at step 1
    assert logged["reward"] == pytest.approx(total.mean().item(), abs=1e-5)


def test_stage_resumes_after_kill_and_compares_sft_with_rl(runs_dir, sft_model, reward_model):  # noqa: F811
    overrides = ["rl.steps=6", "rl.save_steps=2"]
    recipe = smoke(*overrides)
    fake_stage(runs_dir, recipe, "sft", sft_model)
    fake_stage(runs_dir, recipe, "reward", reward_model)
    killed_at = kill_after_checkpoint("rl", runs_dir, overrides)
    workdir = run_root(runs_dir, recipe) / "rl"
    assert read_manifest(workdir).status == "running" and not (workdir / "model").exists()

    tracker = Tracker(runs_dir, experiment="dsv3-test-rl")
    with tracker.pipeline_run("test"):
        outcome = run_stage("rl", recipe, runs_dir, tracker)
    metrics = outcome.manifest.metrics
    assert outcome.action == "resumed" and outcome.manifest.status == "completed"
    assert metrics["train_steps"] == 6 > metrics["resumed_from_step"] >= killed_at > 0
    for model in ("sft", "rl"):
        for name in ("accuracy", "pass_at_2", "format_rate"):
            assert 0 <= metrics[f"heldout_{name}_{model}"] <= 1
        assert 0 < metrics[f"heldout_mean_completion_tokens_{model}"] <= recipe.rl.eval_max_new_tokens
    assert "| greedy accuracy |" in outcome.summary and "| held-out metric | SFT | RL |" in outcome.summary
    assert (workdir / rl.PLOT).stat().st_size > 0

    client = MlflowClient(tracker.uri)
    for name in [f"rewards/{n}/mean" for n in rl.REWARD_NAMES] + ["kl", "completions/mean_length"]:
        steps = sorted(m.step for m in client.get_metric_history(outcome.manifest.mlflow_run_id, f"train/{name}"))
        assert steps == list(range(int(metrics["resumed_from_step"]) + 1, 7)), name
    rl_model = DSV3ForCausalLM.from_pretrained(workdir / "model")
    assert AutoTokenizer.from_pretrained(workdir / "model").chat_template
    assert not torch.equal(rl_model.lm_head.weight, DSV3ForCausalLM.from_pretrained(sft_model).lm_head.weight)


def test_recipe_and_input_errors(tmp_path):
    with pytest.raises(RecipeError, match="rl.correctness_weight: at least one reward weight"):
        smoke("rl.correctness_weight=0", "rl.format_weight=0", "rl.reward_model_weight=0")
    with pytest.raises(RecipeError, match="rl.loss_type"):
        smoke("rl.loss_type=ppo")
    recipe = smoke()
    recipe.rl = None
    with pytest.raises(ValueError, match="no rl section"):
        rl.run(recipe, tmp_path / "rl", {"sft": tmp_path / "sft", "reward": tmp_path / "reward"})
    with pytest.raises(ValueError, match="run the pipeline up to sft"):
        rl.run(smoke(), tmp_path / "rl", {"sft": tmp_path / "sft", "reward": tmp_path / "reward"})
