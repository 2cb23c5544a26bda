"""dsv3/infer/generate.py and `dsv3 generate` / `dsv3 chat`: streaming from a tiny saved checkpoint, bad paths."""

import io

import pytest
import torch

from dsv3.cli import main
from dsv3.data.chat import CHAT_TEMPLATE
from dsv3.data.tokenizer import EOS, save_tokenizer, train_tokenizer
from dsv3.infer.absorbed import uses_absorbed_attention
from dsv3.infer.generate import load_checkpoint
from dsv3.model import DSV3ForCausalLM
from tests.toy_model import toy_config

TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 20]




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model saved with save_pretrained and the dsv3 tokenizer files beside it."""
    out = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_tokenizer(TEXT, vocab_size=300)
    save_tokenizer(tokenizer, out, CHAT_TEMPLATE)
    config = toy_config(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        initializer_range=0.2,
        eos_token_id=tokenizer.token_to_id(EOS),
    )
    torch.manual_seed(0)
    DSV3ForCausalLM(config).save_pretrained(out)
    return out


def test_load_checkpoint_decodes_absorbed(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint)
    assert uses_absorbed_attention(model) and not model.training
    assert tokenizer.eos_token_id == model.config.eos_token_id


@pytest.mark.parametrize("extra", [[], ["--speculative"], ["--temperature", "0.8", "--seed", "3"]])
def test_generate_prints_a_continuation(checkpoint, capsys, extra):
    main(["generate", str(checkpoint), "--prompt", "the quick", "--max-new-tokens", "6", *extra])
    out, err = capsys.readouterr()
    assert out.startswith("the quick") and len(out.strip()) > len("the quick")
    assert "tokens/s" in err
    assert ("MTP acceptance" in err) == ("--speculative" in extra)


def test_speculative_and_plain_generate_print_the_same(checkpoint, capsys):
    outputs = []
    for extra in ([], ["--speculative"]):
        main(["generate", str(checkpoint), "--prompt", "def add", "--max-new-tokens", "8", *extra])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_chat_answers_until_exit(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nwhat is 2+2?\nexit\nnever read\n"))
    main(["chat", str(checkpoint), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert out.count("> ") == 3  # two turns answered, the third prompt read "exit"


@pytest.mark.parametrize("command", [["generate", "{}", "--prompt", "x"], ["chat", "{}"]])
def test_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, command):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main([part.format(path) for part in command])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("dsv3: error:") and err.count("\n") == 1


def test_help_answers(capsys):
    for command in ("generate", "chat"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--speculative" in capsys.readouterr().out
