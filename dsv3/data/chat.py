"""Chat format for post-training (paper §5.1), modelled on DeepSeek-V3's template.

    <|bos|>[<|system|>system text]<|user|>question<|assistant|>answer<|eos|><|user|>...

The role markers and EOS are special tokens (dsv3.data.tokenizer). An assistant turn ends with EOS, so
generation stops on `eos_token_id` and the model learns to stop. Assistant content and its EOS sit inside
`{% generation %}` ... `{% endgeneration %}`, which is what `apply_chat_template(...,
return_assistant_tokens_mask=True)` and TRL's `assistant_only_loss=True` use to train on assistant tokens
only. `add_generation_prompt=True` appends `<|assistant|>`, the prompt TRL's GRPO generates from.
"""

from collections.abc import Sequence

from dsv3.data.tokenizer import ASSISTANT, BOS, EOS, SYSTEM, USER

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + ""
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def check_messages(messages: Sequence[dict]) -> None:
    """Raise a one-line ValueError unless `messages` is a list of {"role", "content"} with known roles."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} needs a str 'content'")


def format_conversation(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The chat template rendered in Python: the exact string `apply_chat_template(tokenize=False)` gives."""
    check_messages(messages)
    marker = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    parts = [BOS]
    for message in messages:
        parts.append(marker[message["role"]] + message["content"])
        if message["role"] == "assistant":
            parts.append(EOS)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def conversation(prompt: str, response: str | None = None, system: str | None = None) -> list[dict]:
    """Build a message list: optional system text, the user's prompt and (for training data) the reply."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages
