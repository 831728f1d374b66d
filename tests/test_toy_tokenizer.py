"""The toy base's CLIP tokenizer is OpenAI CLIP's, built offline from open_clip's merge file."""

from __future__ import annotations

import json

import pytest
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from plural_diffusion.toyworld.images import make_images
from plural_diffusion.toyworld.tokenizer import build_clip_tokenizer
from reward_models.errors import UserError

CAPTIONS = [
    "a dark vivid warm image of two striped circles",
    "a bright grey image of one square",
    "A Medium muted cool image of three speckled triangles",
    "an astronaut riding a horse, oil painting by a famous artist!",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"), model_max_length=32)


def test_vocabulary_files_have_clip_size_and_special_ids(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok2")
    build_clip_tokenizer(out)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # byte symbols, then their word-final forms
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert tokenizer.model_max_length == 32


def test_ids_equal_open_clip_simple_tokenizer(tokenizer):
    reference = SimpleTokenizer(context_length=32)
    captions = CAPTIONS + make_images(20, seed=3).captions
    ours = tokenizer(captions, padding="max_length", max_length=32, truncation=True).input_ids
    theirs = reference(captions).tolist()  # [N, 32], padded with 0
    for text, a, b in zip(captions, ours, theirs):
        n = b.index(49407) + 1  # sot ... eot
        assert a[:n] == b[:n], text
        assert a[0] == 49406 and a[n - 1] == 49407
        # the SD pipeline pads with eot, open_clip with 0
        assert all(i == 49407 for i in a[n:]) and all(i == 0 for i in b[n:])


def test_long_prompts_are_truncated_to_model_max_length_with_eot_last(tokenizer):
    text = " ".join(["circle"] * 40)
    ids = tokenizer(text, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(ids) == 32 and ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == [tokenizer.convert_tokens_to_ids("circle</w>")] * 30


def test_decode_of_encode_round_trips_captions(tokenizer):
    for text in CAPTIONS[:3] + make_images(10, seed=4).captions:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_too_short_max_length_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model_max_length"):
        build_clip_tokenizer(tmp_path, model_max_length=1)
