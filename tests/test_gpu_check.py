"""benchmarks/gpu_check.py on a machine without a GPU: one line and exit 0; its recipe reading (yaml only, for the GPU
machine without pydantic) gives dsv3.config's model; its FLOP count equals one made by walking a model's modules; and
its orchestration (a part in its own process, JSON and markdown out) works in a CPU dry run."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from dsv3.config import load_recipe
from dsv3.model import DSV3ForCausalLM
from dsv3.model.moe import GroupedExperts, Router
from tests.conftest import RECIPES, REPO
from tests.toy_model import toy_config

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

NO_GPU = os.environ | {"CUDA_VISIBLE_DEVICES": ""}


def test_without_cuda_it_prints_one_line_and_exits_0(tmp_path):
    script = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=NO_GPU, timeout=120)  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert script.stdout.splitlines() == [f"gpu-check: no CUDA device (torch {torch.__version__}): nothing measured"]
    assert not (tmp_path / "out").exists()  # nothing claimed, nothing written
    if shutil.which("make"):
        made = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=REPO, capture_output=True, text=True,
                              env=NO_GPU, timeout=120)  # fmt: skip
        assert made.returncode == 0 and made.stdout.splitlines() == script.stdout.splitlines(), made.stdout + made.stderr


@pytest.mark.parametrize("name", ["small.yaml", "smoke.yaml", "tiny.yaml"])
def test_recipe_read_with_yaml_alone_gives_dsv3_configs_model(name):
    recipe = load_recipe(RECIPES / name)
    expected = recipe.model.config(vocab_size=recipe.model.vocab_size or recipe.tokenizer.vocab_size)
    got = gpu_check.recipe_model_config(gpu_check.read_recipe(RECIPES / name))
    assert got.to_dict() == expected.to_dict()


def test_flops_per_token_equal_a_count_over_the_modules():
    """6 x (every weight a token multiplies: linears, routers, norms, K of E routed experts, the head once more per MTP
    depth; not the embedding, a lookup) + 6 x layers x T x heads x (qk + v) for attention."""
    config = toy_config(vocab_size=96, num_nextn_predict_layers=2, n_routed_experts=8, num_experts_per_tok=3, n_group=2,
                        topk_group=1, q_lora_rank=24)  # fmt: skip
    model = DSV3ForCausalLM(config)
    multiplied = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | Router | nn.RMSNorm):
            multiplied += module.weight.numel()
        elif isinstance(module, GroupedExperts):
            multiplied += sum(p.numel() for p in module.parameters()) * config.num_experts_per_tok // config.n_routed_experts
    multiplied += config.num_nextn_predict_layers * model.lm_head.weight.numel()  # the shared head, per MTP depth
    seq = 40
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    attention = 6 * layers * seq * config.num_attention_heads * (
        config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    )
    assert gpu_check.train_flops_per_token(config, seq) == 6 * multiplied + attention


def test_cpu_dry_run_of_the_decode_part_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--parts", "d",
                          "--out", str(out)], capture_output=True, text=True, env=NO_GPU | {"OMP_NUM_THREADS": "1"},
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    part = report["parts"]["d"]
    assert part["status"] == "ok" and not part["errors"], part
    assert [row["model"] for row in part["rows"]] == ["dsv3 absorbed", "transformers DeepseekV3"]
    assert all(row["tokens_per_s"] > 0 and row["steps"] == 2 for row in part["rows"])
    markdown = (out / "gpu-check.md").read_text()
    assert "| dsv3 absorbed | 64 |" in markdown and markdown in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]
