"""dsv3/eval/perplexity.py on hand-made models whose perplexity is known exactly."""

import math
from types import SimpleNamespace

import pytest
import torch

from dsv3.eval.perplexity import (
    perplexity,
    plot_perplexity_by_length,
    window_perplexity,
)

V = 16


class Uniform(torch.nn.Module):
    """Equal logits for every token: perplexity = V whatever the text."""

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


class CountsBack(torch.nn.Module):
    """Knows the next token (previous + 1 mod V) once it has seen `warmup` tokens of its row; uniform before.
    On rows of length T its perplexity is V^((warmup−1)/(T−1)): the first warmup−1 targets are guesses."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup

    def forward(self, input_ids, **kwargs):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, V)
        sure = torch.nn.functional.one_hot((input_ids + 1) % V, V).float() * 1e4
        logits[:, self.warmup - 1 :] = sure[:, self.warmup - 1 :]
        return SimpleNamespace(logits=logits)


class Softly(torch.nn.Module):
    """Leans towards previous + 1 mod V (logit 3) from the first token: a finite loss on any text."""

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.nn.functional.one_hot((input_ids + 1) % V, V).float() * 3.0)


def counting_rows(n: int, length: int) -> torch.Tensor:
    return (torch.arange(n * length) % V).view(n, length)


def test_uniform_model_has_perplexity_vocab_size():
    assert perplexity(Uniform(), torch.randint(0, V, (5, 9)), batch_size=2) == pytest.approx(V)


def test_perplexity_falls_with_context_length_as_predicted():
    model = CountsBack(warmup=4)
    windows = counting_rows(2, 32)
    got = {length: window_perplexity(model, windows, length, batch_size=3)[0] for length in (8, 16, 32)}
    for length, value in got.items():
        assert value == pytest.approx(V ** (3 / (length - 1)), rel=1e-6)
    assert got[8] > got[16] > got[32]


def test_window_perplexity_cuts_each_window_and_states_its_noise():
    """Windows of 32 cut into rows of 8: CountsBack's exact perplexity; identical windows give a standard error of
    0, one window none (nan); windows of unequal difficulty give sd(window means) / √N."""
    model = CountsBack(warmup=4)
    windows = counting_rows(3, 32)
    ppl, se = window_perplexity(model, windows, 8, batch_size=5)
    assert ppl == pytest.approx(V ** (3 / 7), rel=1e-6) and se == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(window_perplexity(model, windows[:1], 16)[1])
    soft = Softly()
    mixed = torch.stack([windows[0], windows[1], torch.randperm(V).repeat(2)])  # the third: no counting to learn
    ppl, se = window_perplexity(soft, mixed, 16)
    ppl_rows = torch.tensor([perplexity(soft, mixed[i].view(2, 16)) for i in range(3)])
    assert ppl == pytest.approx(float(ppl_rows.log().mean().exp()), rel=1e-6)
    assert se == pytest.approx(float(ppl_rows.log().std() / math.sqrt(3)), rel=1e-6) and se > 0.1
    with pytest.raises(ValueError, match="cannot be cut"):
        window_perplexity(model, windows, 64)


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="rows"):
        perplexity(Uniform(), torch.zeros(0, 4, dtype=torch.long))


def test_plot(tmp_path):
    path = plot_perplexity_by_length(
        {"before": {8: 20.0, 16: 30.0}, "after": {8: 19.0, 16: 18.0}}, tmp_path / "p.png", 8
    )
    assert path.read_bytes()[:4] == b"\x89PNG" and math.isfinite(path.stat().st_size)


def test_the_training_loops_validation_perplexity_is_this_one():
    """One definition: on the same model and rows, the pretrain/extend stages' val/perplexity (the training loop's
    validation, dsv3.train.module) equals eval.perplexity's, which the extension's perplexity-by-length uses."""
    import datasets
    import lightning as L

    from dsv3.config import PretrainSection
    from dsv3.train.data import PackedRowsData
    from dsv3.train.module import CausalLMTraining
    from dsv3.train.schedules import step_plan
    from dsv3.train.settings import LoopSettings
    from tests.toy_model import toy_config

    torch.manual_seed(0)
    ids = torch.randint(0, 96, (6, 33))
    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "position_ids": [list(range(33))] * 6})
    settings = LoopSettings.from_pretrain(PretrainSection(steps=1, global_batch_size=2, micro_batch_size=2))
    module = CausalLMTraining(toy_config(initializer_range=0.3), settings, step_plan(settings, 33), torch.ones(96))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=PackedRowsData(rows, rows, settings, step_plan(settings, 33), 0), verbose=False)
    (validation,) = [r for r in module.history if "val/perplexity" in r]
    # rel 1e-5 on perplexity is 7e-7 relative on these 13.5 nats a token: float32 forward passes over other batch
    # shapes (2 rows against 4) and sums in another order differ by about 1.5e-7 relative
    assert validation["val/perplexity"] == pytest.approx(perplexity(module.model, ids, batch_size=4), rel=1e-5)
