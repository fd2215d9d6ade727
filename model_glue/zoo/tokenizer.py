"""The character-level tokenizer shared by every demo zoo model.

One token per character keeps the skills' answers single tokens and lets the tokenizer be
built offline from a fixed alphabet (no training, so it is identical in every build).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2
ALPHABET = (
    string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation + " \n"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over single characters, with pad and eos tokens and no BOS."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split("") isolates every character, whitespace included (no normaliser strips it).
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()  # join the characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation pads on the left
    )
