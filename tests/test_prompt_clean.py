"""Prompts reach the tokenizer cleaned as the reference pipelines clean them: ftfy.fix_text, HTML unescaped
twice, stripped, whitespace runs collapsed (upstream's prompt_clean; the same in diffusers' Wan pipelines).

The expected texts are computed here from ftfy, html and the `regex` module that upstream itself uses, so
the tests hold ours to the libraries' behaviour rather than to strings copied from a run of our code."""

from __future__ import annotations

import dataclasses
import html
import json

import ftfy
import pytest
import regex
import torch

from conftest import WORLDSTEREO_FIXTURES
from keyframe_worlds.engine.pipelines.check import case_conditions, read_case, read_safetensors
from keyframe_worlds.engine.pipelines.components import clean_prompt, load_companions, tokenize_prompts
from keyframe_worlds.engine.pipelines.worldstereo import WorldStereoPipeline

PIPELINE = WORLDSTEREO_FIXTURES / "pipeline"
CASES = ("camera", "memory", "memory-dmd")

RAW = {
    "double-escaped ampersand": "a red chair &amp;amp; a white chair",
    "escaped inside HTML (ftfy leaves it)": "<b>a red chair &amp;amp; a white chair</b>",
    "curly quotes": "the \u201cwooden\u201d table, the \u2018white\u2019 chair",
    "mojibake": "\u00e2\u0153\u201d No problems",
    "whitespace runs": "  a  red\n\tchair \u3000 on\u00a0\u00a0the table  ",
    "escaped no-break spaces": "a&nbsp;&nbsp;red chair",
}


def upstream_clean(text: str) -> str:
    """The reference pipelines' order, with the libraries they call."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


class RecordingTokenizer:
    """The real tokenizer, remembering every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: list[str] = []

    def __call__(self, texts, **kwargs):
        self.texts.extend(texts)
        return self.tokenizer(texts, **kwargs)


@pytest.fixture(scope="module")
def companions():
    return load_companions(PIPELINE / "wan_tiny")


@pytest.mark.parametrize("name", RAW)
def test_clean_prompt_is_ftfy_then_html_twice_then_whitespace(name):
    raw = RAW[name]
    expected = upstream_clean(raw)
    assert expected != raw  # every sample has something to clean
    assert clean_prompt(raw) == expected


def test_the_samples_clean_to_what_the_libraries_document():
    # a few anchors, so that a wrong upstream_clean above cannot pass unnoticed
    assert clean_prompt(RAW["double-escaped ampersand"]) == "a red chair & a white chair"
    assert clean_prompt(RAW["escaped inside HTML (ftfy leaves it)"]) == "<b>a red chair & a white chair</b>"
    assert clean_prompt(RAW["mojibake"]) == "\u2714 No problems"
    assert clean_prompt(RAW["curly quotes"]) == "the \"wooden\" table, the 'white' chair"


def test_unescaping_comes_before_collapsing():
    raw = RAW["escaped no-break spaces"]
    assert clean_prompt(raw) == "a red chair"
    collapse_first = html.unescape(html.unescape(ftfy.fix_text(regex.sub(r"\s+", " ", raw).strip()))).strip()
    assert collapse_first != clean_prompt(raw)  # the order is observable, so the test above can fail


def test_every_unicode_whitespace_collapses_as_upstream_does():
    import re

    spaces = [chr(c) for c in range(0x3001) if re.fullmatch(r"\s", chr(c)) or regex.fullmatch(r"\s", chr(c))]
    assert len(spaces) > 20 and "\x1c" in spaces  # stdlib re and regex differ on U+001C-U+001F
    for c in spaces:
        text = f"red{c}{c}chair"
        assert clean_prompt(text) == upstream_clean(text), hex(ord(c))


@pytest.mark.parametrize("case", CASES)
def test_the_fixture_prompts_clean_as_upstream_cleaned_them(case):
    meta = json.loads((PIPELINE / case / "case.json").read_text(encoding="utf-8"))
    assert clean_prompt(meta["prompt"]) == meta["prompt_cleaned"]
    if meta["negative_prompt_used"]:  # the distilled case never encodes it, so it has no cleaned form
        assert clean_prompt(meta["negative_prompt"]) == meta["negative_prompt_cleaned"]


def test_the_tokenizer_gets_the_cleaned_text(companions):
    spy = RecordingTokenizer(companions.tokenizer)
    raws = list(RAW.values())
    ids, mask = tokenize_prompts(spy, raws)
    assert spy.texts == [upstream_clean(r) for r in raws]
    direct = companions.tokenizer([upstream_clean(r) for r in raws], padding="max_length", max_length=512,
                                  truncation=True, return_tensors="pt")
    assert torch.equal(ids, direct.input_ids) and torch.equal(mask, direct.attention_mask)
    raw_tokens = companions.tokenizer(raws[:1], padding="max_length", max_length=512, return_tensors="pt")
    # "&amp;amp;" is five tokens raw, one cleaned: the cleaning reaches the tokens, not only the text
    assert int(raw_tokens.attention_mask.sum()) == int(mask[0].sum()) + 4


def test_the_pipeline_cleans_the_prompt_and_the_negative_prompt(companions):
    case = read_case(PIPELINE / "camera")
    cond = case_conditions(case, read_safetensors(PIPELINE / "camera" / "inputs.safetensors", "inputs"))
    pipe = WorldStereoPipeline.from_pretrained(case.path, PIPELINE / "wan_tiny", device="cpu",
                                               companions_dir=PIPELINE / "wan_tiny")
    spy = RecordingTokenizer(pipe.companions.tokenizer)
    pipe.companions = dataclasses.replace(pipe.companions, tokenizer=spy)
    prompt, negative = RAW["double-escaped ampersand"], RAW["whitespace runs"]
    traced = {}
    pipe(cond, prompt=prompt, negative_prompt=negative, steps=1, guidance_scale=5.0, seed=0,
         trace=lambda name, value: traced.setdefault(name, value.clone()))
    assert spy.texts == [upstream_clean(prompt), upstream_clean(negative)]
    cleaned = companions.tokenizer([upstream_clean(prompt)], padding="max_length", max_length=512, return_tensors="pt")
    assert torch.equal(traced["text.input_ids"], cleaned.input_ids)
