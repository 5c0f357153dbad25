"""Save the tiny Llama of examples/train_tiny.py, with a byte-level tokenizer, as an ordinary model folder.

The client examples (``trl_sft.py``, ``hf_trainer.py``, ``accelerate_loop.py``) take a model path, as a real
training script does; this writes one without any hub access::

    python examples/make_tiny_model.py runs/tiny-llama

The folder holds what ``save_pretrained`` writes for the model (random-init, the 2-layer config of
``train_tiny.py``) and for the tokenizer. The tokenizer maps text to its UTF-8 bytes (ids 0-255) plus ``<pad>``
(256), ``<s>`` (257, put before every text) and ``</s>`` (258): the same ids ``train_tiny.py`` builds by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from train_tiny import BOS, EOS, PAD, tiny_llama_config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}


def byte_symbols() -> list[str]:
    """The printable character standing for each byte value, as the byte-level pre-tokenizer writes bytes: bytes
    that are printable Latin-1 characters stand for themselves, the others for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for value in range(256):
        if value in printable:
            symbols[value] = chr(value)
        else:
            symbols[value] = chr(256 + extra)
            extra += 1
    return [symbols[value] for value in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Text -> ``<s>`` + one token per UTF-8 byte (token id = byte value); no merges, no unknown tokens."""
    vocab = {symbol: value for value, symbol in enumerate(byte_symbols())}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([SPECIALS[i] for i in sorted(SPECIALS)])  # ids 256, 257, 258 in that order
    raw.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[BOS]} $A", pair=f"{SPECIALS[BOS]} $A $B", special_tokens=[(SPECIALS[BOS], BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token=SPECIALS[PAD], bos_token=SPECIALS[BOS], eos_token=SPECIALS[EOS]
    )


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny Llama (float32, random-init with ``seed``) and its tokenizer to ``folder``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(folder)
    tokenizer = byte_tokenizer()
    for token_id, token in SPECIALS.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(
                f"tokenizer gave {token} the id {tokenizer.convert_tokens_to_ids(token)}, not {token_id}"
            )
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the model and tokenizer (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {save_tiny_model(args.folder, args.seed)}")


if __name__ == "__main__":
    main()
