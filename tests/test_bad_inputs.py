"""Bad input through the `dsv3` command line (flows/cli.py over dsv3/cli.py): every case ends with exactly one line
on stderr naming the file or key, exit code 2, and no traceback anywhere in the output."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dsv3.data.chat import CHAT_TEMPLATE
from dsv3.data.tokenizer import EOS, save_tokenizer, train_tokenizer
from dsv3.model import DSV3ForCausalLM, DSV3ForSequenceClassification
from flows.cli import main
from tests.conftest import RECIPES, REPO
from tests.test_lock import HOLD
from tests.toy_model import toy_config

SMOKE = str(RECIPES / "smoke.yaml")


def one_line_exit_2(capsys, argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith("dsv3: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


RECIPE_CASES = {
    "missing file": (None, "recipe file not found"),
    "a folder": ("<dir>", "recipe file not found"),
    "invalid YAML": ("name: [unclosed\n", "not valid YAML"),
    "not UTF-8": (b"name: caf\xe9\n", "not UTF-8"),
    "a list": ("- a\n- b\n", "a recipe is a mapping"),
    "no name": ("seed: 1\n", "name: required key is missing"),
    "unknown key": (f"base: {SMOKE}\npretrain:\n  lr: 3e-4\n", "pretrain.lr: unknown key"),
    "wrong type": (f"base: {SMOKE}\nseed: many\n", "seed:"),
    "out of range": (f"base: {SMOKE}\ndata:\n  seq_len: 2\n", "data.seq_len"),
    "missing base": ("base: nowhere.yaml\nname: x\n", "nowhere.yaml"),
    "inconsistent": (f"base: {SMOKE}\nmodel:\n  topk_group: 5\n", "model.topk_group"),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_bad_recipe(case, tmp_path, capsys):
    content, needle = RECIPE_CASES[case]
    path = tmp_path / "recipe.yaml"
    if content == "<dir>":
        path.mkdir()
    elif content is not None:
        write(path, content)
    for command in (["run", "--recipe", str(path), "--runs-dir", str(tmp_path / "runs")], ["recipe", str(path)]):
        one_line_exit_2(capsys, command, needle)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_recipe_that_builds_on_itself(tmp_path, capsys):
    write(tmp_path / "a.yaml", "base: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nname: b\n")
    one_line_exit_2(capsys, ["recipe", str(tmp_path / "a.yaml")], "builds on itself")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("pretrain.lr", "expected key=value"),
        ("seed.deeper=1", "seed is a value"),
        ("pretrain.lr=3e-4", "pretrain.lr: unknown key"),
        ("pretrain.lr_peak=.nan", "pretrain.lr_peak"),
        ("pipeline.stages=[pretrain,tokenizer]", "pipeline.stages"),
    ],
)
def test_bad_override(override, needle, tmp_path, capsys):
    one_line_exit_2(capsys, ["run", "--recipe", SMOKE, "--set", override, "--runs-dir", str(tmp_path)], needle)


PARALLEL_CASES = {
    "experts not divisible by E": (
        ["pretrain.devices=4", "pretrain.micro_batch_size=2", "pretrain.strategy=fsdp", "pretrain.expert_parallel=4",
         "model.n_routed_experts=6"],
        "pretrain.expert_parallel: 4 must divide model.n_routed_experts (6)",
    ),  # fmt: skip
    "E above the world size": (
        ["pretrain.devices=2", "pretrain.strategy=fsdp", "pretrain.expert_parallel=4"],
        "pretrain.expert_parallel: 4 must divide the world size",
    ),
    "fsdp on one process": (["pretrain.strategy=fsdp"], "pretrain.strategy: fsdp shards over several processes"),
    "replicas that do not divide the world": (
        ["pretrain.devices=2", "pretrain.strategy=fsdp", "pretrain.fsdp_replicate=4"],
        "pretrain.fsdp_replicate: 4 must divide the world size devices × num_nodes (2)",
    ),
    "HSDP under ddp": (["pretrain.devices=2", "pretrain.fsdp_replicate=2"], "pretrain.fsdp_replicate: HSDP replicates a sharded model"),
    "E above a replica's ranks": (
        ["pretrain.devices=4", "pretrain.micro_batch_size=2", "pretrain.strategy=fsdp", "pretrain.fsdp_replicate=2",
         "pretrain.expert_parallel=4"],
        "pretrain.expert_parallel: 4 must divide the world size devices × num_nodes / fsdp_replicate (2)",
    ),  # fmt: skip
    "EP under ddp": (["pretrain.devices=2", "pretrain.expert_parallel=2"], "pretrain.expert_parallel: expert parallelism runs under strategy fsdp"),
    "a phase batch the ranks cannot split": (
        ["pretrain.devices=4", "pretrain.micro_batch_size=2"],
        "extend.phases: phase 1's global_batch_size (4) must be a multiple of",
    ),
}


@pytest.mark.parametrize("case", PARALLEL_CASES)
def test_bad_parallel_layout(case, tmp_path, capsys):
    overrides, needle = PARALLEL_CASES[case]
    sets = [arg for override in overrides for arg in ("--set", override)]
    one_line_exit_2(capsys, ["run", "--recipe", SMOKE, *sets, "--runs-dir", str(tmp_path / "runs")], needle)
    one_line_exit_2(capsys, ["plan", SMOKE, *sets], needle)
    assert not (tmp_path / "runs").exists()


def test_until_a_stage_the_recipe_does_not_run(tmp_path, capsys):
    argv = ["run", "--recipe", SMOKE, "--set", "pipeline.stages=[tokenizer]", "--until", "rl", "--runs-dir", str(tmp_path)]
    one_line_exit_2(capsys, argv, "--until rl: not a stage")


def test_runs_dir_that_is_a_file(tmp_path, capsys):
    runs = write(tmp_path / "runs", "not a folder")
    one_line_exit_2(capsys, ["run", "--recipe", SMOKE, "--runs-dir", runs], runs, "is a file")


def test_runs_dir_inside_a_file(tmp_path, capsys):
    parent = write(tmp_path / "file", "x")
    one_line_exit_2(capsys, ["run", "--recipe", SMOKE, "--runs-dir", f"{parent}/runs"], "cannot create it")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_runs_dir_not_writable(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o555)
    one_line_exit_2(capsys, ["run", "--recipe", SMOKE, "--runs-dir", str(runs)], "not writable")


def test_runs_dir_in_use(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), str(REPO)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_exit_2(capsys, ["run", "--recipe", SMOKE, "--runs-dir", str(tmp_path)], "is in use by pid")
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in err and "recipes/tiny.yaml" in err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.source=local", "data.paths=[{missing}]"], "does not exist"),
        (["sft.chat_data=[{missing}]"], "does not exist"),
    ],
)
def test_missing_data_files_fail_before_anything_runs(overrides, needle, tmp_path, capsys):
    missing = str(tmp_path / "nowhere.jsonl")
    argv = ["run", "--recipe", SMOKE, "--runs-dir", str(tmp_path / "runs")]
    for item in overrides:
        argv += ["--set", item.format(missing=missing)]
    one_line_exit_2(capsys, argv, needle, "nowhere.jsonl")
    assert not (tmp_path / "runs" / "prefect").exists()  # refused before Prefect started


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    save_tokenizer(tokenizer, out, CHAT_TEMPLATE)
    config = toy_config(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_token_id=tokenizer.token_to_id(EOS))
    torch.manual_seed(0)
    DSV3ForCausalLM(config).save_pretrained(out)
    return out


def broken_copy(checkpoint, tmp_path, how: str):
    folder = tmp_path / how
    shutil.copytree(checkpoint, folder)
    config = folder / "config.json"
    if how == "no-config":
        config.unlink()
    elif how == "config-not-json":
        config.write_text("{not json")
    elif how == "other-model-type":
        config.write_text(json.dumps(json.loads(config.read_text()) | {"model_type": "llama"}))
    elif how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "pickle-only":
        (folder / "model.safetensors").unlink()
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    elif how == "truncated-weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "reward-model":
        shutil.rmtree(folder)
        model = DSV3ForSequenceClassification.from_pretrained(checkpoint, num_labels=1)
        model.save_pretrained(folder)
        for item in checkpoint.iterdir():
            if item.name.startswith(("tokenizer", "special", "chat")):
                shutil.copy(item, folder / item.name)
    return str(folder)


CHECKPOINT_CASES = {
    "no-config": "config.json",
    "config-not-json": "not valid JSON",
    "other-model-type": "model_type 'llama'",
    "no-tokenizer": "tokenizer.json",
    "pickle-only": "model.safetensors",
    "truncated-weights": "model.safetensors",
    "reward-model": "not a causal language model",
}


@pytest.mark.parametrize("how", CHECKPOINT_CASES)
def test_bad_checkpoint_for_generate_and_chat(how, checkpoint, tmp_path, capsys):
    folder = broken_copy(checkpoint, tmp_path, how)
    for argv in (["generate", folder, "--prompt", "x"], ["chat", folder]):
        one_line_exit_2(capsys, argv, CHECKPOINT_CASES[how])


def test_checkpoint_that_is_a_file_or_missing(tmp_path, capsys):
    one_line_exit_2(capsys, ["generate", str(tmp_path / "missing"), "--prompt", "x"], "not a directory")
    one_line_exit_2(capsys, ["generate", write(tmp_path / "file", "x"), "--prompt", "x"], "not a directory")


@pytest.mark.parametrize("option, needle", [(["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "-1"], "temperature")])
def test_bad_generation_options(option, needle, checkpoint, capsys):
    one_line_exit_2(capsys, ["generate", str(checkpoint), "--prompt", "x", *option], needle)


@pytest.mark.parametrize(
    "how", ["no-config", "config-not-json", "other-model-type", "truncated-weights", "pickle-only", "no-tokenizer"]
)
def test_bad_checkpoint_for_export(how, checkpoint, tmp_path, capsys):
    one_line_exit_2(capsys, ["export-hf", broken_copy(checkpoint, tmp_path, how), str(tmp_path / "out")], CHECKPOINT_CASES[how])
    assert not (tmp_path / "out").exists()


def test_export_onto_a_file_and_import_of_a_non_deepseek_folder(checkpoint, tmp_path, capsys):
    one_line_exit_2(capsys, ["export-hf", str(checkpoint), write(tmp_path / "out", "x")], "out")
    one_line_exit_2(capsys, ["import-hf", str(checkpoint), str(tmp_path / "imported")], "deepseek_v3")
    one_line_exit_2(capsys, ["import-hf", str(tmp_path / "missing"), str(tmp_path / "imported")], "missing")


def test_report_of_nothing(tmp_path, capsys):
    one_line_exit_2(capsys, ["report", str(tmp_path / "nothing"), "--runs-dir", str(tmp_path)], "nothing")
