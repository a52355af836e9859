"""Reading built files back for people: ``python -m sftprep inspect`` and ``verify``."""

from __future__ import annotations

import json
import os

import numpy as np

from sftprep import idxmap
from sftprep.writer import MANIFEST

TRAINED = ("\x1b[32m", "\x1b[0m")  # green on a terminal
TRAINED_PLAIN = ("⟦", "⟧")


def manifest_of(prefix: str) -> dict:
    path = prefix + MANIFEST
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def verify(prefix: str, tokenizer=None) -> dict:
    """Check every invariant; raise ``idxmap.LayoutError`` at the first violation."""
    m = manifest_of(prefix)
    S = m.get("summary", {}).get("seq_length")
    pad = m.get("tokenizer", {}).get("pad_id")
    vocab = m.get("tokenizer", {}).get("vocab_size")
    if tokenizer is not None:
        pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    return idxmap.check_sft_layout(idxmap.IndexedReader(prefix), S, pad, vocab)


def describe_document(reader: idxmap.IndexedReader, k: int, tokenizer, color: bool) -> str:
    """Document ``k`` decoded: samples one by one, trained text marked, padding summarized.

    A token is marked trained when the label before it predicts it (``labels[t-1] != -100``).
    """
    row = np.asarray(reader.document(k))
    S = len(row) // 2
    inputs, labels = row[:S], row[S:]
    ids = np.where(inputs < 0, -1 - inputs, inputs)
    trained = np.zeros(S, dtype=bool)
    trained[1:] = labels[:-1] != idxmap.IGNORE_INDEX
    open_, close = TRAINED if color else TRAINED_PLAIN
    ends = np.flatnonzero(inputs < 0)
    out = [f"document {k}: {len(ends)} samples, {ends[-1] + 1 if len(ends) else 0} tokens, "
           f"{S - (ends[-1] + 1 if len(ends) else 0)} pad (trained text {open_}marked{close})"]
    start = 0
    for n, end in enumerate(ends):
        seg_ids, seg_trained = ids[start:end + 1], trained[start:end + 1]
        cuts = np.flatnonzero(np.diff(seg_trained.astype(np.int8))) + 1
        runs = np.split(np.arange(len(seg_ids)), cuts)
        spans = [f"{start + r[0]}..{start + r[-1]}" for r in runs if seg_trained[r[0]]]
        out.append(f"--- sample {n} (tokens {start}..{end}; {int(seg_trained.sum())} trained in "
                   f"{len(spans)} span{'s' * (len(spans) != 1)}: {', '.join(spans)})")
        text = []
        for run in runs:
            piece = tokenizer.decode(seg_ids[run].tolist())
            text.append(f"{open_}{piece}{close}" if seg_trained[run[0]] else piece)
        out.append("".join(text))
        start = end + 1
    if start < S:
        out.append(f"--- padding: {S - start} x id {int(inputs[start])}")
    return "\n".join(out)
