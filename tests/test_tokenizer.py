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


# Texts that exercise the byte-level BPE: digits, runs of spaces, tabs and newlines, contractions,
# non-ASCII, emoji, special tokens inside text, the agent's tags.
_TEXTS = [
    "In 1984, 12345 people", "Hello  world\n\n  x", "it's they'll WE'VE I'm", "\t\ttabs  \r\n",
    "<think>ok</think><search> capital of France </search>", "x</answer>\n",
    "naïve café — 日本語 😀",
    "<|im_start|>user\nhi<|im_end|>\n", "Doc 1: The George Washington Bridge opened in 1931.",
    "   leading spaces", "a\u00a0non-breaking space", "mixed123abc 4.5e-3 $1,000,000",
]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers_and_needs_no_torch(smollm2_tokenizer, smollm2_gguf):
    """Built from the GGUF's metadata with `tokenizers` alone; the same ids as transformers'
    torch-backed GGUF loader, except where that loader ignores the file's `smollm`
    pre-tokenizer (every digit split off first, as SmolLM2's own tokenizer.json and llama.cpp
    do): a run of spaces before a digit stays one token here."""
    import os

    from transformers import AutoTokenizer

    from zerosearch_jax.data import synthetic

    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                        gguf_file=os.path.basename(smollm2_gguf))
    tok = smollm2_tokenizer
    world = synthetic.build_world(synthetic.WorldConfig(seed=0))
    texts = _TEXTS + [q.question for q in world.questions("train")[:300]]
    texts += [p["contents"] for p in world.passages[:200]]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    # The digit rule: "  122" is "ĠĠ" + digits (SmolLM2's tokenizer.json), not "Ġ" "Ġ" + digits.
    spaces = tok.encode("  ")
    assert len(spaces) == 1 and tok.encode("in  122") == tok.encode("in") + spaces + [
        tok.encode(d)[0] for d in "122"]
    assert tok.vocab_size == len(ref) and tok.eos_ids[0] == ref.eos_token_id
    assert tok.pad_id == ref.pad_token_id and tok.bos_id == ref.bos_token_id
    messages = [{"role": "user", "content": "Who wrote Hamlet?"}]
    assert tok.chat_prompt("Who wrote Hamlet?") == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_gguf_tokenizer_round_trips_through_save_pretrained(smollm2_tokenizer, tmp_path):
    from zerosearch_jax.tokenizer import Tokenizer

    smollm2_tokenizer.save_pretrained(str(tmp_path))
    again = Tokenizer.from_pretrained(str(tmp_path))
    for text in _TEXTS:
        assert again.encode(text) == smollm2_tokenizer.encode(text)
    assert again.chat_prompt("hi") == smollm2_tokenizer.chat_prompt("hi")
    assert again.eos_ids == smollm2_tokenizer.eos_ids and again.pad_id == smollm2_tokenizer.pad_id


def test_gguf_tokenizer_refuses_an_unsupported_vocabulary_by_name(tmp_path):
    import gguf

    from zerosearch_jax.models.weights import WeightsError
    from zerosearch_jax.tokenizer import gguf_tokenizer

    path = str(tmp_path / "spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="tokenizer type 'llama'.*Hugging Face directory"):
        gguf_tokenizer(path)
