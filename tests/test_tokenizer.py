"""Tokenizer wrapper: chat template, pad/eos, agent tags and their stop patterns."""

import numpy as np
import pytest


def test_chat_prompt_and_special_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.chat_prompt("Who are you?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWho are you?<|im_end|>" in prompt
    assert tok.pad_id == 2 and 2 in tok.eos_ids and tok.bos_id == 1
    ids = tok.encode(prompt)
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == prompt


def test_pad_batch_left_and_right(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = tok.pad_batch([[5, 6, 7], [8]])
    np.testing.assert_array_equal(ids, [[5, 6, 7], [2, 2, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    ids, mask = tok.pad_batch([[5, 6, 7], [8]], length=4, left=False)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 2], [8, 2, 2, 2]])
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens"):
        tok.pad_batch([[1, 2, 3]], length=2)


@pytest.mark.parametrize("tag", ["</search>", "</answer>"])
@pytest.mark.parametrize("before", ["capital of France", "Paris ", "x\n", "(1999).", " the"])
def test_stop_patterns_detect_the_tag_in_context(smollm2_tokenizer, tag, before):
    tok = smollm2_tokenizer
    patterns = tok.stop_patterns(tag)
    ids = tok.encode("<think>ok</think>" + before + tag)
    assert any(p.matches(ids) for p in patterns)
    # Every prefix that does not yet complete the tag must not match.
    for n in range(1, len(ids)):
        prefix = ids[:n]
        if tag not in tok.decode(prefix):
            assert not any(p.matches(prefix) for p in patterns), tok.decode(prefix)


def test_stop_pattern_arrays(smollm2_tokenizer):
    (p, *_) = smollm2_tokenizer.stop_patterns("</search>")
    arr = p.as_array()
    assert arr.dtype == np.int32 and arr.shape[0] == len(p.sets)
    for row, s in zip(arr, p.sets, strict=True):
        assert set(row[row >= 0].tolist()) == set(s)


def test_tag_ids(smollm2_tokenizer):
    tags = smollm2_tokenizer.tag_ids()
    assert smollm2_tokenizer.decode(tags["</search>"]) == "</search>"
    assert set(tags) >= {"<search>", "</search>", "<answer>", "</answer>", "<information>"}
