"""dsv3/fp8/plugin.py: `pretrain.precision: fp8-blockwise` trains the smoke recipe with FP8 linear layers, BF16
AdamW moments, and a run killed part-way resumes to exactly the uninterrupted run's losses; checkpoints and the
exported model hold ordinary FP32 master weights."""

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsv3.config import load_recipe
from dsv3.fp8 import FP8BlockwisePrecision, fp8_modules
from dsv3.model import DSV3ForCausalLM
from dsv3.stages import run_stage
from dsv3.store.runs import run_root
from tests.conftest import RECIPES
from tests.test_fp8_convert import expected_fp8_names
from tests.test_model import tiny_model
from tests.test_pretrain import kill_at, start_killable_run

FP8 = ["pretrain.precision=fp8-blockwise", "pretrain.fp8_backend=emulated", "pretrain.optimizer_states_bf16=true",
       "pretrain.steps=8", "pretrain.val_every_n_steps=8", "pretrain.checkpoint_every_n_steps=2"]


def last_checkpoint(runs_dir, name: str, overrides: list[str]):
    return run_root(runs_dir, load_recipe(RECIPES / "smoke.yaml", [f"name={name}", *overrides])) / "pretrain" / "checkpoints" / "last.ckpt"


def test_plugin_converts_in_place_and_autocasts_bf16():
    plugin = FP8BlockwisePrecision("emulated", device="cpu")
    model = tiny_model()
    assert plugin.convert_module(model) is model and fp8_modules(model) == expected_fp8_names()
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="backend"):
        FP8BlockwisePrecision("fp16")


@pytest.mark.slow
def test_smoke_recipe_trains_in_fp8_and_resumes_after_a_kill(tmp_path):
    runs_dir, killed_runs = tmp_path / "whole", tmp_path / "killed"  # one folder would share the equal stages
    process = start_killable_run(killed_runs, "fp8-killed", *FP8)  # tests/test_pretrain.py's kill, with overrides
    with ThreadPoolExecutor(1) as pool:  # the run to kill trains in its subprocess beside the whole run here
        killed = pool.submit(kill_at, process, last_checkpoint(killed_runs, "fp8-killed", FP8))
        recipe = load_recipe(RECIPES / "smoke.yaml", ["name=fp8-whole", *FP8])
        run_stage("tokenizer", recipe, runs_dir)
        whole = run_stage("pretrain", recipe, runs_dir)
    expected = whole.manifest.metrics

    assert killed.result() == -signal.SIGKILL
    resumed = run_stage("pretrain", load_recipe(RECIPES / "smoke.yaml", ["name=fp8-killed", *FP8]), killed_runs)
    assert resumed.action == "resumed"
    got = resumed.manifest.metrics
    assert 0 < got["resumed_from_step"] < got["steps"] == 8
    assert got["final_val_loss"] == pytest.approx(expected["final_val_loss"], abs=1e-6)
    assert got["final_train_loss"] == pytest.approx(expected["final_train_loss"], abs=1e-6)
    assert expected["final_train_loss"] < expected["unigram_val_loss"] + 1.0  # it learned something

    # the checkpoint holds the plain model's keys in fp32 and bf16 AdamW moments
    ckpt = torch.load(whole.workdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    plain = DSV3ForCausalLM.from_pretrained(whole.workdir / "model")
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert set(weights) == set(plain.state_dict())
    assert all(v.dtype == torch.float32 for v in weights.values())
    moments = [s["exp_avg_sq"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    assert fp8_modules(plain) == []  # export is an ordinary model
