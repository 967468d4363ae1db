"""Small BPE tokenizers trained on the dataset's own text, for the tiny models.

The embedded default cannot download CLIP's or Qwen2's tokenizer, so the tiny retriever and the
tiny questioner get a byte-level BPE trained with the ``tokenizers`` library on the synthetic
corpus, wrapped as a ``PreTrainedTokenizerFast`` and saved with ``save_pretrained``: loading it
back goes through ``AutoTokenizer.from_pretrained`` exactly like a real checkpoint's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def train_bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    special_tokens: dict[str, str],
    extra_special_tokens: list[str] | None = None,
    lowercase: bool = False,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus``.

    ``special_tokens`` maps transformers' roles (``bos_token``, ``eos_token``, ``pad_token``,
    ``mask_token``, ``unk_token``) to token strings; ``extra_special_tokens`` are further
    tokens that must never be split (ChatML markers, ``<image>``). Special tokens get the first
    ids, in the order given.
    """
    extra = list(extra_special_tokens or [])
    specials = list(dict.fromkeys([*special_tokens.values(), *extra]))
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, **special_tokens
    )
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast
