"""Word-level tokenizer of the toy model (``tokenizers`` WordLevel, wrapped for transformers).

Spaces and tabs separate words and are dropped; a newline is a token of its own, so the
task's demonstration separator ``"\\n"`` is one token. ``" good"`` (a label word with its
leading space) is the single token ``good``. Unknown words map to ``<|unk|>``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from icl_lens.toy.task import vocabulary

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)


def build_raw_tokenizer() -> Tokenizer:
    """The ``tokenizers.Tokenizer`` (no special tokens added on encode)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer():
    """A ``transformers`` fast tokenizer with bos/eos/pad/unk (BOS added on encode)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
    )
