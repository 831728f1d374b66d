"""The CLIP BPE tokenizer of the toy base, built offline from open_clip's shipped vocabulary.

Stable Diffusion pipelines expect a `transformers.CLIPTokenizer` directory (`vocab.json` and
`merges.txt`). Those files are a pure function of the BPE merge list that open_clip ships as
`bpe_simple_vocab_16e6.txt.gz`, so we write them from it instead of downloading them: the ids are
the ones OpenAI's CLIP (and so every SD text encoder) uses.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

from reward_models.errors import UserError
from reward_models.io import atomic_path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# OpenAI's CLIP keeps the first 49152 - 256 - 2 merges of the file: 256 byte symbols and the two
# special tokens fill the vocabulary up to 49408 entries.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408


def clip_bpe_vocab(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and merge list ("a b" strings, in rank order).

    The id order is CLIP's: the 256 byte symbols, their end-of-word (`</w>`) forms, one token per
    merge, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
    """
    path = Path(bpe_path) if bpe_path is not None else Path(default_bpe())
    if not path.is_file():
        raise UserError(f"{path}: CLIP BPE merge file not found; reinstall open_clip_torch")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is the file's "#version" header
    merges = [" ".join(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, "duplicate token in the CLIP vocabulary"
    return vocab, merges


def build_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 32) -> CLIPTokenizer:
    """Write CLIP's `vocab.json` and `merges.txt` into `out_dir` and load a `CLIPTokenizer` on them.

    `model_max_length` is the padded prompt length (tokens, sot and eot included) that a pipeline
    asks the tokenizer for; it must equal the text encoder's `max_position_embeddings`.
    """
    if model_max_length < 2:
        raise UserError(f"model_max_length={model_max_length}: must be >= 2 (sot and eot tokens)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    with atomic_path(out_dir / "vocab.json") as tmp:
        tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with atomic_path(out_dir / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=model_max_length)
