"""Tokenizer wrapper: chat template, pad/eos conventions, and the agent's tag tokens.

Wraps a `transformers` tokenizer (from a HF directory, a hub id, or built from a GGUF file's
embedded vocabulary) and adds what the rollout needs:

- `chat_prompt(user_text)`: the template applied with the generation prompt (base models
  without a template get the raw text, as upstream);
- `pad_id` / `eos_ids`: a pad id always exists (eos when the tokenizer has none), and every id
  that ends a turn (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ...) is an eos id;
- `stop_patterns(tag)`: token patterns that detect a closing tag such as `</search>` on device.
  BPE splits a tag differently by context (`</` `search` `>` after a word, ` </` `search` `>`
  after a space, `>` merged with a following newline), so a pattern is a short sequence of id
  *sets*, one set per position, matched against the last generated tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

# Tags of the ZeroSearch policy template (docs/method.md §2).
AGENT_TAGS = ("<think>", "</think>", "<search>", "</search>", "<information>",
              "</information>", "<answer>", "</answer>")
_EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclasses.dataclass(frozen=True)
class StopPattern:
    """A closing tag as token-id sets: `sets[j]` holds the ids allowed at position j of the
    last len(sets) tokens. Frozen and hashable so samplers can take it as a static argument."""

    text: str
    sets: tuple[frozenset[int], ...]

    def as_array(self, width: int | None = None) -> np.ndarray:
        """[P, M] int32, rows padded with -1 (M = width or the largest set)."""
        width = width or max(len(s) for s in self.sets)
        out = np.full((len(self.sets), width), -1, np.int32)
        for j, s in enumerate(self.sets):
            out[j, : len(s)] = sorted(s)
        return out

    def matches(self, ids: Sequence[int]) -> bool:
        """Host-side check: do the last tokens of `ids` complete the tag?"""
        n = len(self.sets)
        return len(ids) >= n and all(t in s for t, s in zip(ids[-n:], self.sets, strict=True))


class Tokenizer:
    """A `transformers` tokenizer with the conventions the agent relies on."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        vocab = self.hf.get_vocab()
        eos = [self.hf.eos_token_id] if self.hf.eos_token_id is not None else []
        eos += [vocab[t] for t in _EXTRA_EOS_TOKENS if t in vocab]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos))
        if not self.eos_ids:
            raise ValueError("tokenizer has no eos token; set one before wrapping it")
        pad = self.hf.pad_token_id
        self.pad_id: int = int(pad if pad is not None else self.eos_ids[0])
        self.bos_id: int | None = self.hf.bos_token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> Tokenizer:
        """From a HF directory, a `.gguf` file, an embedded model name, or a hub id."""
        from transformers import AutoTokenizer

        from zerosearch_jax.models.hub import resolve_model

        path = resolve_model(name_or_path)
        hf = gguf_tokenizer(path) if path.endswith(".gguf") else AutoTokenizer.from_pretrained(path)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def save_pretrained(self, out_dir: str) -> None:
        self.hf.save_pretrained(out_dir)

    # -- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added (templates already contain them)."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, user_text: str, system: str | None = None) -> str:
        """`user_text` as a chat turn with the assistant's generation prompt appended.

        Tokenizers without a chat template (base models) get the text unchanged, as upstream.
        """
        if not getattr(self.hf, "chat_template", None):
            return user_text
        messages = [{"role": "user", "content": user_text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def pad_batch(self, seqs: Sequence[Sequence[int]], length: int | None = None,
                  left: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Pads id lists to [B, length] int32 (left by default) and returns (ids, mask)."""
        length = length or max(len(s) for s in seqs)
        ids = np.full((len(seqs), length), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), length), bool)
        for i, s in enumerate(seqs):
            if len(s) > length:
                raise ValueError(f"sequence {i} has {len(s)} tokens, more than length={length}")
            if s:
                sl = slice(length - len(s), length) if left else slice(0, len(s))
                ids[i, sl] = s
                mask[i, sl] = True
        return ids, mask

    # -- agent tags --------------------------------------------------------------------------

    @functools.cached_property
    def token_strings(self) -> list[str]:
        """Each id's text on its own ([vocab_size])."""
        return [self.hf.decode([i]) for i in range(self.vocab_size)]

    @functools.cache  # noqa: B019 (one tokenizer per run; cache lives with it)
    def stop_patterns(self, tag: str) -> tuple[StopPattern, ...]:
        """Token patterns whose completion means `tag` was just generated.

        Built from the tag's tokenization in common contexts (after a word, a space, a newline,
        at the start); the first position accepts any token ending with the first piece and the
        last position any token starting with the last piece (`>` or `>\\n`, for instance).
        """
        strings = self.token_strings
        seen: dict[tuple[str, ...], None] = {}
        for ctx in ("x", "x ", "x\n", "", "x."):
            ids = self.encode(ctx + tag)
            pieces: list[str] = []
            text = ""
            for i in reversed(ids):  # the shortest suffix of tokens that spells the tag
                pieces.insert(0, strings[i])
                text = strings[i] + text
                if tag in text:
                    break
            if tag in text:
                seen[tuple(pieces)] = None
        patterns = []
        for pieces in seen:
            if len(pieces) == 1:
                sets = (frozenset(i for i, s in enumerate(strings) if tag in s),)
            else:
                head = pieces[0][pieces[0].index(tag[0]):] if tag[0] in pieces[0] else pieces[0]
                tail_len = len(tag) - len(head) - sum(len(p) for p in pieces[1:-1])
                tail = tag[len(tag) - tail_len:]
                first = frozenset(i for i, s in enumerate(strings) if s.endswith(head))
                middle = [frozenset(i for i, s in enumerate(strings) if s == p)
                          for p in pieces[1:-1]]
                last = frozenset(i for i, s in enumerate(strings) if s.startswith(tail) and s)
                sets = (first, *middle, last)
            if all(sets):
                patterns.append(StopPattern(tag, tuple(sets)))
        merged: dict[tuple[frozenset[int], ...], StopPattern] = {p.sets: p for p in patterns}
        return tuple(merged.values())

    def tag_ids(self) -> dict[str, tuple[int, ...]]:
        """Each agent tag's ids when it starts a line (for building prompts and inspection)."""
        return {t: tuple(self.encode(t)) for t in AGENT_TAGS}


# -- tokenizers of GGUF files ----------------------------------------------------------------
#
# A GGUF file stores its tokenizer as metadata (llama.cpp key names): the vocabulary, the BPE
# merges, each token's type, the special ids and the chat template. transformers' own GGUF
# loader reads that metadata through a module that imports torch, which a runtime install does
# not have, so the byte-level BPE tokenizers (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3,
# Qwen2/2.5/3) are built here with the `tokenizers` library directly.

# How text is split before BPE, by `tokenizer.ggml.pre` (llama.cpp's `llama-vocab.cpp` names),
# as the regex of a `Split` pre-tokenizer. Types not listed use GPT-2's built-in split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# Pre-tokenizers that split every digit on its own before GPT-2's split (SmolLM's was trained so).
_GGUF_DIGIT_SPLIT = ("smollm",)
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the spelling of byte-level vocabs)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}


def gguf_tokenizer(path: str):
    """A `transformers` fast tokenizer built from a GGUF file's metadata, without torch.

    Supports byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`), which covers the
    SmolLM2, Llama 3 and Qwen families; other types name the alternative (a HF directory).
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    from zerosearch_jax.models.weights import GGUFSource, WeightsError

    src = GGUFSource(path)
    kind = src.field("tokenizer.ggml.model")
    tokens = src.field("tokenizer.ggml.tokens")
    if kind != "gpt2" or not tokens:
        raise WeightsError(
            f"{path}: tokenizer type {kind!r} cannot be built from a GGUF file here (byte-level "
            f"BPE, 'gpt2', can); pass a Hugging Face directory with tokenizer.json instead")
    spelling = _byte_unicode()
    alphabet = set(spelling.values())
    # Byte-level vocabularies spell every byte with `spelling`; a token in other characters
    # (a mislabelled control token) is re-spelled from its UTF-8 bytes, as HF's converter does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in src.field("tokenizer.ggml.merges", [])]
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = src.field("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _GGUF_SPLITS)
    if pre in _GGUF_SPLITS:
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"), byte_level])
    elif pre in _GGUF_DIGIT_SPLIT:
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        rust.pre_tokenizer = byte_level
    rust.decoder = decoders.ByteLevel()
    types = src.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t, k in zip(tokens, types, strict=True)
                             if k == _GGUF_CONTROL and set(t) <= alphabet])
    rust.add_tokens([AddedToken(t, special=False, normalized=False)
                     for t, k in zip(tokens, types, strict=True) if k == _GGUF_USER_DEFINED])

    def special(key: str) -> str | None:
        i = src.field(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding"),
        chat_template=src.field("tokenizer.chat_template"))
