"""dsv3/stages/extend.py on the smoke recipe: the YaRN config it builds (over the pretraining length, declared for
s times it or the last phase's length) equals transformers' yarn RoPE (frequencies, cos/sin factor and the softmax
scale of DeepseekV3Attention); the stage trains both phases, evaluates before and after, writes a loadable YaRN
model; a run killed with SIGKILL mid-phase resumes from its checkpoint and finishes; its perplexity before extension at
the pretraining length measures what pretraining's validation loss measures, and agrees with it within the noise."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from dsv3.config import RecipeError, load_recipe
from dsv3.data.corpus import recipe_corpus
from dsv3.data.dataset import build_lm_dataset
from dsv3.data.tokenizer import load_tokenizer
from dsv3.eval.perplexity import row_nlls
from dsv3.model import DSV3ForCausalLM
from dsv3.report import _md, write_report
from dsv3.stages import run_stage
from dsv3.stages.extend import METRICS_NOTE, extended_config, perplexity_rows
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.train.data import validation_subset
from tests.conftest import RECIPES, REPO
from tests.toy_model import toy_config

KILLABLE_RUN = """
import sys
from dsv3.config import load_recipe
from dsv3.stages import run_stage
recipe = load_recipe(sys.argv[1], sys.argv[3:])
for stage in ("tokenizer", "pretrain", "extend"):
    run_stage(stage, recipe, sys.argv[2])
"""


def smoke(name: str, *overrides: str):
    return load_recipe(RECIPES / "smoke.yaml", [f"name={name}", *overrides])


def test_yarn_config_matches_transformers_rope_and_softmax_scale():
    recipe = load_recipe(
        RECIPES / "tiny.yaml", ["extend.factor=40", "extend.mscale=0.707", "extend.mscale_all_dim=0.707"]
    )
    plain = toy_config(
        vocab_size=64,
        qk_rope_head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config = extended_config(plain, recipe)
    assert config.rope_parameters["original_max_position_embeddings"] == recipe.data.seq_len == 256
    assert config.max_position_embeddings == 40 * 256 > recipe.extend.phases[-1].seq_len  # s·L, past the last phase
    hf = DeepseekV3Config(
        rope_parameters=dict(config.rope_parameters),
        max_position_embeddings=config.max_position_embeddings,
        qk_rope_head_dim=16,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_attention_heads=2,
        hidden_size=32,
        kv_lora_rank=16,
        q_lora_rank=None,
    )
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    model = DSV3ForCausalLM(config)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected_freq)
    assert math.isclose(model.model.rotary_emb.attention_factor, expected_factor)
    expected_scale = DeepseekV3Attention(hf, layer_idx=0).scaling
    assert math.isclose(model.model.layers[0].self_attn.softmax_scale, expected_scale, rel_tol=1e-12)
    assert expected_scale > 24**-0.5  # mscale² > 1 actually scaled the softmax


def test_phases_must_grow():
    with pytest.raises(RecipeError, match="extend.phases"):
        smoke("bad", "extend.phases=[{seq_len: 256, steps: 1}, {seq_len: 128, steps: 1}]")


def kill_mid_phase(runs_dir: Path, name: str) -> int:
    """Run the pipeline up to extend in a subprocess; SIGKILL it once phase 1 has written a checkpoint."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", KILLABLE_RUN, str(RECIPES / "smoke.yaml"), str(runs_dir), f"name={name}"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_root(runs_dir, smoke(name)) / "extend" / "phase1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    return process.wait()


@pytest.mark.slow
def test_extend_runs_and_resumes_after_kill(runs_dir):
    name = "smoke-extend"
    assert kill_mid_phase(runs_dir, name) == -signal.SIGKILL
    workdir = run_root(runs_dir, smoke(name)) / "extend"
    assert read_manifest(workdir).status == "running"
    assert not (workdir / "model").exists()
    recipe = smoke(name)
    outcome = run_stage("extend", recipe, runs_dir)
    assert outcome.action == "resumed"
    metrics = outcome.manifest.metrics
    assert 0 < metrics["resumed_from_step_phase1"] < recipe.extend.phases[0].steps
    assert metrics["steps"] == sum(p.steps for p in recipe.extend.phases)
    for label in ("before", "after"):
        for length in recipe.extend.passkey_lengths:
            assert 0 <= metrics[f"passkey_accuracy_{label}_L{length}"] <= 1
        for length in recipe.extend.perplexity_lengths:
            assert math.isfinite(metrics[f"ppl_{label}_L{length}"])
        assert metrics[f"second_copy_loss_{label}"] > 0 and math.isfinite(metrics[f"induction_gain_{label}"])
    for artifact in (
        "passkey_before.png",
        "passkey_after.png",
        "perplexity_by_length.png",
        "loss_curves.png",
    ):
        assert (workdir / artifact).is_file(), artifact

    model = DSV3ForCausalLM.from_pretrained(workdir / "model")
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == recipe.extend.factor
    assert rope["original_max_position_embeddings"] == recipe.data.seq_len
    assert (workdir / "model" / "tokenizer.json").is_file()
    assert run_stage("extend", recipe, runs_dir).action == "skipped"


@pytest.mark.slow
def test_perplexity_at_the_pretraining_length_is_pretrainings_validation_loss(runs_dir, tmp_path):
    """One model, one perplexity: the extension's perplexity before training at the pretraining length L is scored
    on rows of pretraining's own validation set (the validation split packed the same way: no FIM, no BOS, documents
    joined by EOS — here every one of its rows of L is one of them), and it agrees with pretraining's final
    validation loss within 3 standard errors of their difference. The two are other evenly spread samples of one
    split: the extension's standard error is its stage's (the spread of its windows), pretraining's is the spread
    of its val_max_rows rows over √their number; hypot of the two is the difference's (the samples overlap, which
    only makes it smaller)."""
    recipe = smoke("smoke-ppl")
    metrics = {stage: run_stage(stage, recipe, runs_dir).manifest.metrics for stage in ("tokenizer", "pretrain", "extend")}
    length = recipe.data.seq_len
    model_dir = run_root(runs_dir, recipe) / "pretrain" / "model"
    tokenizer = load_tokenizer(model_dir)
    corpus = recipe_corpus(recipe.data)
    rows = build_lm_dataset(corpus["validation"], tokenizer, length, 0.0, 0.0, recipe.seed, tmp_path / "cache")
    windows = perplexity_rows(recipe, tokenizer, corpus["validation"], tmp_path / "cache")
    cut = windows[:, : windows.shape[1] // length * length].reshape(-1, length)
    assert set(map(tuple, cut.tolist())) <= set(map(tuple, rows["input_ids"]))
    assert windows.numel() == metrics["extend"]["perplexity_tokens"] >= 16 * max(recipe.extend.perplexity_lengths)

    pretrain_rows = validation_subset(rows, recipe.pretrain.val_max_rows)
    ids = torch.tensor(np.asarray(pretrain_rows.with_format("numpy")["input_ids"]), dtype=torch.long)
    per_row = row_nlls(DSV3ForCausalLM.from_pretrained(model_dir), ids) / (length - 1)
    val_loss = metrics["pretrain"]["final_val_loss"]
    assert float(per_row.mean()) == pytest.approx(val_loss, rel=1e-5)  # these are the rows it was measured on
    pretrain_se = float(per_row.std()) / math.sqrt(len(per_row))
    extend_se = metrics["extend"][f"ppl_rel_se_before_L{length}"]
    difference = math.log(metrics["extend"][f"ppl_before_L{length}"]) - val_loss
    assert 0 < extend_se < 0.05 and abs(difference) <= 3 * math.hypot(pretrain_se, extend_se), (difference, pretrain_se, extend_se)

    report, _ = write_report(run_root(runs_dir, recipe))  # the report card says so under the stage's metrics
    assert _md(METRICS_NOTE) in report.read_text().split("## Stage: extend", 1)[1].split("## Stage:", 1)[0]
