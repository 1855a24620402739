"""A real fast tokenizer without downloads: byte-level BPE with no merges (one token per byte)
plus BOS/EOS — what the tiny models of the matrix and the tests use."""

from __future__ import annotations

from typing import Any

BYTE_VOCAB = 256 + 2  # bytes + <bos> + <eos>
BOS, EOS = 256, 257


def byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<bos>": BOS, "<eos>": EOS})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )
