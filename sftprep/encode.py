"""Texts to token ids and trained token ranges: the Hugging Face tokenizer, or an exact fast path.

The tokenizer stage spends three quarters of its time encoding. For byte-level BPE tokenizers
(Qwen2/2.5/3, Llama-3, GLM-4, MiniMax, ...) a ``tiktoken`` Encoding made from ``tokenizer.json``
gives the same ids at about five times the speed: the ranks are the vocabulary's ids through the
GPT-2 byte map, the pattern is the ``Split`` pre-tokenizer's, the added tokens are its special
tokens. ``prepare`` decides on the driver, once per build, whether that holds for this tokenizer
(a known shape of normalizer, pre-tokenizer, model, post-processor and decoder; merges whose
results have increasing ids; every token the BPE of its own text), and ships what the actors need
(the tokenizer as JSON, the fast path's tables, the chat template) so they never import
transformers. Anything unfamiliar takes the Hugging Face path.

Two traps: the ``NFC`` normalizer is HF's own (Python's ``unicodedata`` is an older Unicode and
orders some recent combining marks differently), applied to each segment between added tokens
(a combining mark right after ``<|im_end|>`` would compose with its ``>`` otherwise). A text made
only of characters NFC can never change skips that; a text NFC does change goes the HF way.

Identity is not provable from the files alone (a tokenizer.json does not promise that every
adjacent pair forming a token is a listed merge), so tests prove it on real data and adversarial
text, and every build re-encodes a deterministic subset through HF and stops at any difference
(``tokenize.Tokenize``).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field

import numpy as np

# Characters that NFC leaves alone in any context: canonical combining class 0, no
# decomposition, never part of a canonical composition (ASCII to spacing modifiers, general
# punctuation but its two singletons, CJK punctuation but its tone marks, CJK ideographs,
# fullwidth forms, variation selectors, emoji). tests/test_encode.py checks every one.
NFC_STABLE = re.compile("[^\x00-\u02ff\u2002-\u206f\u3000-\u3029\u3030-\u303f\u4e00-\u9fff"
                        "\ufe00-\ufe0f\uff01-\uffdc\U0001f000-\U0001faff]")


# The pattern of tokenizers' ByteLevel pre-tokenizer with use_regex (GPT-2's).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@dataclass
class Setup:
    """What every tokenizer actor needs, built once on the driver (``prepare``), and what the
    driver needs of the tokenizer besides (its pad token and size, for the writers and the
    manifest), so a build never needs the HF tokenizer object again once this is made."""

    tokenizer_json: str               # the backend tokenizer, pad token included
    chat_template: str
    special_tokens_map: dict          # what apply_chat_template passes to the template
    pad_token: str | None
    pad_id: int | None
    vocab_size: int                   # len(tokenizer): added tokens included
    backend: str                      # "fast" (tiktoken) or "hf"
    reason: str                       # why that backend
    fast: dict | None = field(default=None, repr=False)  # FastBPE's tables
    renderer: str = "jinja"           # "traced" (trace.TracedTemplate) or "jinja"

    def describe(self) -> dict:
        return {"backend": self.backend, "reason": self.reason, "renderer": self.renderer}


def prepare(tok, backend: str = "auto") -> Setup:
    """Choose the backend for a loaded HF tokenizer: ``auto`` takes the fast path if it applies,
    and renders through traces of the chat template (``trace``); ``hf`` is the reference."""
    text = tok.backend_tokenizer.to_str()
    fast, reason = None, "--tokenizer-backend hf"
    if backend == "auto":
        fast, reason = fast_tables(json.loads(text))
        if fast is not None:
            reason = _self_check(tok.backend_tokenizer.model, fast) or reason
            fast = None if reason != FAST_REASON else fast
    return Setup(text, tok.chat_template, dict(tok.special_tokens_map), tok.pad_token,
                 tok.pad_token_id, len(tok), "fast" if fast else "hf", reason, fast,
                 "traced" if backend == "auto" else "jinja")


FAST_REASON = "byte-level BPE: tiktoken with the tokenizer's own vocabulary, pattern and NFC"


def fast_tables(spec: dict) -> tuple[dict | None, str]:
    """The fast path's tables for a tokenizer.json, or None and the reason it does not apply."""
    norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer"), spec["model"]
    norms = [norm] if norm and norm["type"] != "Sequence" else (norm or {}).get("normalizers", [])
    if [n["type"] for n in norms] not in ([], ["NFC"]):
        return None, f"normalizer {[n['type'] for n in norms]} (only none or NFC is known)"
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre]
    shape = [s and s["type"] for s in steps]
    if shape == ["Split", "ByteLevel"] and not steps[1]["use_regex"]:
        split, byte_level = steps
        if split["behavior"] != "Isolated" or split["invert"] or "Regex" not in split["pattern"]:
            return None, "a Split pre-tokenizer other than an isolated regex"
        pattern = split["pattern"]["Regex"]
    elif shape == ["ByteLevel"] and steps[0]["use_regex"]:  # GPT-2's own pattern
        byte_level, pattern = steps[0], GPT2_PATTERN
    else:
        return None, f"pre-tokenizer {shape} (only Split then ByteLevel, or ByteLevel, is known)"
    if byte_level["add_prefix_space"]:
        return None, "a ByteLevel pre-tokenizer that adds a prefix space"
    if (model["type"] != "BPE" or model.get("dropout") or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        return None, f"model {model['type']} with options the fast path does not have"
    if not _post_processor_ok(spec.get("post_processor")):
        return None, "post-processor other than ByteLevel without trimmed offsets"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None, "decoder is not ByteLevel"
    added = {}
    for a in spec.get("added_tokens", []):
        if a["lstrip"] or a["rstrip"] or a["single_word"] or not a["content"] or (
                a["normalized"] and norms):
            return None, f"added token {a['content']!r} has matching options"
        added[a["content"]] = a["id"]
    contents = sorted(added)
    if any(b.startswith(a) for a, b in zip(contents, contents[1:])):
        return None, "one added token is a prefix of another"
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = model["vocab"]
    if any(c not in vocab for c in byte_of):
        return None, "the vocabulary lacks a byte"
    ranks = {}
    for token, i in vocab.items():
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            return None, f"vocabulary entry {token!r} is not byte-level"
    if len(set(ranks.values())) != len(ranks):
        return None, "two vocabulary entries share an id"
    last, made = -1, set()
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or a not in vocab or b not in vocab or i < last:
            return None, "merges whose results are not in the vocabulary in merge order"
        last = i
        made.add(a + b)
    if len(made) + len(byte_of) != len(vocab):
        return None, "vocabulary entries that no merge makes"
    lengths = np.zeros(max(list(vocab.values()) + list(added.values()) + [0]) + 1, np.int64)
    for token, i in ranks.items():
        lengths[i] = len(token)
    for content, i in added.items():
        lengths[i] = len(content.encode("utf-8"))
    return {"ranks": ranks, "pattern": pattern, "specials": added,
            "nfc": bool(norms), "lengths": lengths,
            "ignore_merges": bool(model.get("ignore_merges"))}, FAST_REASON


def _post_processor_ok(p: dict | None) -> bool:
    if p is None or p["type"] == "TemplateProcessing":  # templates add nothing without
        return True                                      # add_special_tokens, which is off
    if p["type"] == "Sequence":
        return all(map(_post_processor_ok, p["processors"]))
    return p["type"] == "ByteLevel" and not p["trim_offsets"]


def _self_check(model, fast: dict) -> str | None:
    """tiktoken takes a piece that is a whole token as that token; HF's BPE (unless it ignores
    merges) must reach the same token from the piece's bytes, for every token."""
    if fast["ignore_merges"]:
        return None
    unicode_of = bytes_to_unicode()
    for token, i in fast["ranks"].items():
        if len(token) > 1:
            got = model.tokenize("".join(unicode_of[b] for b in token))
            if len(got) != 1 or got[0].id != i:
                return f"the BPE of token {i} is not that token"
    return None


class HFEncoder:
    """The reference: the HF fast tokenizer, trained spans through its character offsets."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_str(tokenizer_json)

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple]:
        """``(ids, token spans)`` per text: ids as int32, each character span ``(a, b)`` as the
        first token starting at or after ``a`` and after ``b``."""
        out = []
        for text, char_spans, enc in zip(texts, spans, self.tok.encode_batch(
                texts, add_special_tokens=False)):
            n, text_len = len(enc.ids), len(text)
            out.append((np.array(enc.ids, dtype=np.int32),
                        [(_token_at(enc, a, n, text_len), _token_at(enc, b, n, text_len))
                         for a, b in char_spans]))
        return out


def _token_at(enc, char: int, n: int, text_len: int) -> int:
    """Index of the first token starting at or after character ``char`` of the encoded text.

    A boundary inside a token (a template whose turns are not split by special tokens) puts
    that token on the earlier side.
    """
    while char < text_len:
        t = enc.char_to_token(char)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= char else t + 1
        char += 1
    return n


class FastEncoder:
    """The fast path: tiktoken ids, trained spans from the tokens' byte lengths.

    A token starts at character ``c`` or later exactly when its first byte is at or after the
    first byte of ``c`` (a token that starts inside a character starts, for HF, at that
    character), so a span's token is a binary search over the tokens' byte offsets. Texts NFC
    would change, and texts Python cannot encode (lone surrogates), go to ``hf``.
    """

    def __init__(self, fast: dict, hf: HFEncoder):
        import tiktoken
        self.enc = tiktoken.Encoding("sftprep", pat_str=fast["pattern"],
                                     mergeable_ranks=fast["ranks"],
                                     special_tokens=fast["specials"])
        self.lengths = fast["lengths"]
        self.hf = hf
        self.nfc = None
        if fast["nfc"]:
            from tokenizers.normalizers import NFC
            self.nfc = NFC()
            self.special = re.compile("|".join(map(re.escape, sorted(
                fast["specials"], key=len, reverse=True)))) if fast["specials"] else None

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple]:
        out: list = [None] * len(texts)
        slow, done, id_lists, cuts = [], [], [], []  # cuts: (sample, byte offset) per boundary
        for k, (text, char_spans) in enumerate(zip(texts, spans)):
            if text.isascii():
                cuts += [(len(done), c) for span in char_spans for c in span]
            else:
                try:
                    data = text.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates: whatever HF does with them
                    data = None
                if data is None or (self.nfc and NFC_STABLE.search(text)
                                    and self._nfc_changes(text)):
                    slow.append(k)
                    continue
                cuts += [(len(done), len(text[:c].encode("utf-8")))
                         for span in char_spans for c in span]
            done.append(k)
            id_lists.append(self.enc.encode(text, allowed_special="all", disallowed_special=()))
        if done:
            for k, r in zip(done, self._with_spans(id_lists, cuts, spans, done)):
                out[k] = r
        if slow:
            for k, r in zip(slow, self.hf.encode([texts[k] for k in slow],
                                                 [spans[k] for k in slow])):
                out[k] = r
        return out

    def _with_spans(self, id_lists: list[list[int]], cuts: list[tuple[int, int]],
                    spans: list, done: list[int]) -> list[tuple]:
        """All the batch's ids in one array, every boundary found by one binary search over the
        byte offsets where the batch's tokens start (each text's offsets shifted by the bytes of
        the texts before it, so one text's end is the next one's first token start)."""
        counts = np.fromiter(map(len, id_lists), np.int64, len(id_lists))
        ends = np.cumsum(counts)
        begins = ends - counts
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), np.int32, int(ends[-1]))
        token_bytes = self.lengths[flat]
        byte_ends = np.cumsum(token_bytes)
        byte_starts = byte_ends - token_bytes
        base = np.concatenate(([0], byte_ends))[begins]
        if cuts:
            owner, offset = np.array(cuts, dtype=np.int64).T
            found = (np.searchsorted(byte_starts, base[owner] + offset) - begins[owner]).tolist()
        out, j = [], 0
        for i, k in enumerate(done):
            m = 2 * len(spans[k])
            out.append((flat[begins[i]:ends[i]],
                        [(found[j + 2 * s], found[j + 2 * s + 1]) for s in range(m // 2)]))
            j += m
        return out

    def _nfc_changes(self, text: str) -> bool:
        """Whether HF's NFC changes any segment between added tokens (each is normalized alone)."""
        parts = self.special.split(text) if self.special else [text]
        return any(self.nfc.normalize_str(p) != p for p in parts)


def encoder(setup: Setup) -> tuple[HFEncoder | FastEncoder, HFEncoder]:
    """The stage's encoder for a setup, and the HF encoder that checks it."""
    hf = HFEncoder(setup.tokenizer_json)
    return (FastEncoder(setup.fast, hf) if setup.backend == "fast" else hf), hf
