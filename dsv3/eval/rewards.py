"""Rewards for GRPO (paper §5.2.1): rule-based ones for questions with a deterministic answer "in a designated
format (e.g., in a box)", and the reward model's score.

Each is a callable with TRL's reward-function signature, `reward(prompts, completions, **columns) -> list[float]`,
one float per completion. Completions come as plain text or, for conversational prompts, as a list holding
one assistant message; the dataset's other columns (here `answer`) arrive as keyword lists.

* `correctness_reward`: 1.0 when the last \\boxed{...} equals the reference under math-verify, else 0.0
  (a missing or unparseable box scores 0).
* `format_reward`: 1.0 when the completion is well formed (exactly one non-empty \\boxed{...}, at its end).
* `RewardModelScore`: the reward model's scalar for prompt + completion rendered in the chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv3.data.math_tasks import is_well_formed
from dsv3.eval.accuracy import answer_is_correct


def completion_text(completion: str | Sequence[dict]) -> str:
    """The text of a completion: itself when plain, else the content of its (assistant) messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def correctness_reward(completions: Sequence, answer: Sequence[str], **_) -> list[float]:
    """Rule-based accuracy reward: 1.0 when the final \\boxed{} answer verifies against `answer`, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"correctness_reward: {len(completions)} completions but {len(answer)} answers")
    return [
        float(answer_is_correct(completion_text(c), ref)) for c, ref in zip(completions, answer, strict=True)
    ]


def format_reward(completions: Sequence, **_) -> list[float]:
    """Format reward: 1.0 when the completion ends with exactly one non-empty \\boxed{} answer, else 0.0."""
    return [float(is_well_formed(completion_text(c))) for c in completions]


class RewardModelScore:
    """Model-based reward: a sequence-classification model's score (num_labels = 1, read at the last non-pad
    token) of each prompt + completion, rendered with the tokenizer's chat template and scored in batches."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 32):
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output (num_labels=1), got {model.config.num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # the head reads the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        """prompt + completion as one conversation (or one string when both are plain text)."""
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, str):
                out.append(prompt + completion_text(completion) + self.tokenizer.eos_token)
            else:
                if isinstance(completion, str):
                    completion = [{"role": "assistant", "content": completion}]
                out.append(
                    self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
                )
        return out

    @torch.inference_mode()
    def __call__(self, prompts: Sequence, completions: Sequence, **_) -> list[float]:
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                padding_side="right",
                add_special_tokens=False,
                return_tensors="pt",
            ).to(self.model.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()  # (B,)
        return scores
