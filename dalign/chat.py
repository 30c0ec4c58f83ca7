"""The chat template and tokenization with labels on assistant turns only.

The default template is Zephyr's: each turn is '<|role|>\\n' + content + eos + '\\n', and a
generation prompt is '<|assistant|>\\n'. Labels cover each assistant turn's content and its
closing eos (so the model learns to stop) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label value that cross-entropy skips

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>",
                  "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside assistant turns

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class TemplateError(ValueError):
    """The chat template does not render conversations as a growing prefix."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant reply plus its eos.

    Found by rendering growing prefixes of the conversation; a template for which the
    shorter conversation is not a prefix of the longer one cannot be masked this way."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        after = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(after)):
            raise TemplateError("the chat template does not render conversations as growing prefixes")
        end = after.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)
        spans.append((len(before), end))
    return text, spans


def tokenize_dialogue(tokenizer, messages: list[dict]) -> Tokenized:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside else IGNORE)
    return Tokenized(input_ids=list(enc["input_ids"]), labels=labels)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the generation prompt."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
