"""dsv3/eval/harness.py: `dsv3 eval` runs lm-evaluation-harness offline with the project's three tasks on a stage's
model folder, writes lm_eval.json beside stage.json, logs to the stage's MLflow run; bad input is one line."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from dsv3.cli import main
from dsv3.data import CHAT_TEMPLATE, save_tokenizer, train_tokenizer
from dsv3.eval.harness import TASKS, hf_folder
from dsv3.model import DSV3ForCausalLM
from dsv3.model.hf import export_hf
from dsv3.store.manifest import Manifest, StageKey, write_manifest
from dsv3.tracking import Tracker
from tests.conftest import RECIPES
from tests.toy_model import toy_config

SMOKE = str(RECIPES / "smoke.yaml")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """runs/stages/sft/abc: a random toy model (with tokenizer) in model/, and a manifest naming an MLflow run."""
    runs = tmp_path_factory.mktemp("runs")
    folder = runs / "stages" / "sft" / "abc"
    tokenizer = train_tokenizer(["Ava has 3 apples. Solve for x: 2x + 1 = 5. \\boxed{2}\n" * 20], vocab_size=300)
    save_tokenizer(tokenizer, folder / "model", CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = toy_config(vocab_size=tokenizer.get_vocab_size(), bos_token_id=0, eos_token_id=1, pad_token_id=2,
                        max_position_embeddings=64)  # fmt: skip
    DSV3ForCausalLM(config).save_pretrained(folder / "model")
    tracker = Tracker(runs, "test")
    with tracker.stage_run("sft", {}) as run_id:
        pass
    write_manifest(folder, Manifest("sft", "completed", StageKey("r", {}, "c"), "v", mlflow_run_id=run_id))
    return folder, tracker, run_id


def test_eval_runs_the_three_tasks_and_writes_json_and_mlflow(stage, capsys):
    folder, tracker, run_id = stage
    main(["eval", str(folder / "model"), "--recipe", SMOKE, "--limit", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert all(task in out for task in TASKS) and f"logged to MLflow run {run_id}" in out
    written = json.loads((folder / "lm_eval.json").read_text())
    assert set(written["results"]) == set(TASKS) == {"dsv3_math", "dsv3_bpb", "dsv3_arith_mc"}
    assert written["samples"]["dsv3_math"] == written["samples"]["dsv3_arith_mc"] == 2
    assert 0 <= written["results"]["dsv3_math"]["exact_match"] <= 1
    assert 0 <= written["results"]["dsv3_arith_mc"]["acc"] <= 1
    assert 5 < written["results"]["dsv3_bpb"]["bits_per_byte"] < 12  # random weights: ~log2(vocab) / bytes per token
    logged = tracker.client.get_run(run_id).data.metrics
    assert logged["lm_eval/dsv3_bpb/bits_per_byte"] == pytest.approx(written["results"]["dsv3_bpb"]["bits_per_byte"])
    assert [a.path for a in MlflowClient(tracker.uri).list_artifacts(run_id)] == ["lm_eval.json"]


def test_an_export_folder_is_read_as_it_is(stage, tmp_path):
    folder, _, _ = stage
    exported = export_hf(folder / "model", tmp_path / "hf")
    with hf_folder(exported) as used:
        assert used == exported


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "checkpoint /no/such/model is not a directory"),
        (["MODEL", "--tasks", "hellaswag"], "unknown task hellaswag: choose from dsv3_arith_mc, dsv3_bpb, dsv3_math"),
    ],
)
def test_bad_input_is_one_line(stage, capsys, args, message):
    folder, _, _ = stage
    args = [str(folder / "model") if a == "MODEL" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args, "--recipe", SMOKE])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
