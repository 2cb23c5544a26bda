"""The GRPO rewards (dsv3/eval/rewards.py) on hand-written completions: correct, wrong, unparseable, malformed;
plain and conversational; and the reward model's score against a direct forward pass of the same text."""

import pytest
import torch
from transformers import AutoTokenizer

from dsv3.data.chat import CHAT_TEMPLATE, conversation
from dsv3.data.math_tasks import generate_problems
from dsv3.data.tokenizer import save_tokenizer, train_tokenizer
from dsv3.eval.rewards import RewardModelScore, completion_text, correctness_reward, format_reward
from dsv3.model import DSV3ForSequenceClassification
from tests.toy_model import toy_config

CASES = [  # completion, reference, correct, well formed
    ("3 + 4 = 7.\nThe answer is \\boxed{7}.", "7", 1.0, 1.0),
    ("So x = -3, the answer is \\boxed{-3}", "-3", 1.0, 1.0),
    ("12 / 1 = 12. \\boxed{12.0}", "12", 1.0, 1.0),  # math-verify: 12.0 = 12
    ("\\boxed{\\frac{24}{2}}", "12", 1.0, 1.0),
    ("The answer is \\boxed{8}.", "7", 0.0, 1.0),  # wrong
    ("The answer is \\boxed{banana}.", "7", 0.0, 1.0),  # unparseable
    ("The answer is 7.", "7", 0.0, 0.0),  # no box
    ("The answer is \\boxed{7.", "7", 0.0, 0.0),  # unclosed box
    ("\\boxed{}", "7", 0.0, 0.0),  # empty box
    ("\\boxed{5} no, \\boxed{7}", "7", 1.0, 0.0),  # the last box counts; two boxes are malformed
    ("\\boxed{7} and then some more words", "7", 1.0, 0.0),  # text after the box
    ("", "7", 0.0, 0.0),
]


@pytest.mark.parametrize(("text", "reference", "correct", "formed"), CASES)
def test_rule_rewards_on_hand_examples(text, reference, correct, formed):
    assert correctness_reward([text], answer=[reference]) == [correct]
    assert format_reward([text]) == [formed]
    as_message = [{"role": "assistant", "content": text}]  # TRL's conversational completions
    assert correctness_reward([as_message], answer=[reference], prompts=[None]) == [correct]
    assert format_reward([as_message], prompts=[None], trainer_state=None) == [formed]


def test_rule_rewards_score_a_batch_in_order():
    texts = [c[0] for c in CASES]
    assert correctness_reward(texts, [c[1] for c in CASES]) == [c[2] for c in CASES]
    assert format_reward(texts) == [c[3] for c in CASES]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        correctness_reward(texts[:2], ["7"])
    assert completion_text([{"role": "assistant", "content": "a"}]) == "a"


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm")
    problems = generate_problems(40, "train", seed=3)
    tokenizer = train_tokenizer([p["prompt"] + "\n" + p["solution"] for p in problems], vocab_size=300)
    save_tokenizer(tokenizer, folder, CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = toy_config(
        vocab_size=len(tokenizer),
        q_lora_rank=1536,
        num_nextn_predict_layers=0,
        max_position_embeddings=256,
        initializer_range=0.2,
        num_labels=1,
    )
    torch.manual_seed(0)
    return DSV3ForSequenceClassification(config).eval(), tokenizer, problems


def test_reward_model_score_is_the_score_of_the_chat_text_whatever_the_padding(reward_model):
    model, tokenizer, problems = reward_model
    prompts = [conversation(p["prompt"]) for p in problems[:3]]
    completions = [
        [{"role": "assistant", "content": problems[0]["solution"]}],
        "The answer is \\boxed{1}.",  # plain text after a conversational prompt
        [{"role": "assistant", "content": "?"}],  # much shorter: padded in the batch
    ]
    scores = RewardModelScore(model, tokenizer, batch_size=3)(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        text = completion if isinstance(completion, str) else completion[0]["content"]
        rendered = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": text}], tokenize=False
        )
        assert rendered.endswith(text + tokenizer.eos_token)
        ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert score == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    assert len(set(scores)) == 3
    one_at_a_time = RewardModelScore(model, tokenizer, batch_size=1)(prompts, completions)
    assert one_at_a_time == pytest.approx(scores, abs=1e-5)


def test_reward_model_score_needs_one_output(reward_model):
    model, tokenizer, _ = reward_model
    model.config.num_labels = 2
    try:
        with pytest.raises(ValueError, match="num_labels=1"):
            RewardModelScore(model, tokenizer)
    finally:
        model.config.num_labels = 1
