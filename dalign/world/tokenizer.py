"""A byte-level BPE tokenizer trained on world text with the chat template's special tokens."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dalign.chat import SPECIAL_TOKENS, ZEPHYR_TEMPLATE


def train_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str = ZEPHYR_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Digits split one by one so that arithmetic sees every digit; byte-level for the rest.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
                                   pad_token=SPECIAL_TOKENS["pad"],
                                   additional_special_tokens=[SPECIAL_TOKENS[k] for k in ("system", "user", "assistant")])
    fast.chat_template = chat_template
    return fast
