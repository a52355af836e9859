"""Reading built files back for people: ``python -m sftprep inspect`` and ``verify``."""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np

from sftprep import idxmap, trainer
from sftprep.idxmap import MANIFEST
from sftprep.shards import unnamed_shards
from sftprep.outputs import STALE_ORDER

TRAINED = ("\x1b[32m", "\x1b[0m")  # green on a terminal
TRAINED_PLAIN = ("⟦", "⟧")


SHARD = re.compile(r"(.*)_\d+_text_document")


class IncompleteBuild(FileNotFoundError):
    """Shard files that no manifest names: a sharded build stopped before its manifest, the
    commit point of the shard set, was written."""


def find_prefix(given: str) -> str:
    """The files' prefix for what a person typed: the prefix itself, the build's
    ``--output-prefix`` (without ``_text_document``), or one of the files' names. Shards that
    no manifest names are an incomplete build (``IncompleteBuild``), not an output."""
    stem = given
    for suffix in (".bin", ".idx", MANIFEST, ".rejects.jsonl"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    tried = [stem] if stem.endswith("_text_document") else [stem, stem + "_text_document"]
    shard = SHARD.fullmatch(stem)
    output = shard.group(1) if shard else stem.removesuffix("_text_document")
    unnamed = unnamed_shards(output, manifest_of(output + "_text_document"),
                             lambda p: any(os.path.exists(p + s) for s in STALE_ORDER))
    if unnamed and (stem in unnamed or not shard and not any(
            os.path.exists(idxmap.idx_path(p)) for p in tried)):
        manifest = f"{output}_text_document{MANIFEST}"
        why = "does not name them" if os.path.exists(manifest) else "is missing"
        raise IncompleteBuild(
            f"{given}: an incomplete build: {', '.join(unnamed)} with no manifest naming them "
            f"({manifest} {why}); the build stopped before it finished: build again (it "
            "removes them)")
    for prefix in tried:
        if os.path.exists(idxmap.idx_path(prefix)) and os.path.exists(idxmap.bin_path(prefix)):
            return prefix
    looked = " and ".join(f"{p}.bin/.idx" for p in tried)
    folder = os.path.dirname(stem) or "."
    found = sorted({n[:-4] for n in os.listdir(folder) if n.endswith(".idx")}) \
        if os.path.isdir(folder) else []
    hint = (f"prefixes there: {', '.join(os.path.join(folder, n) for n in found[:5])}" if found
            else f"no .idx files in {folder}" if os.path.isdir(folder)
            else f"{folder} does not exist")
    raise FileNotFoundError(f"{given}: looked for {looked}; {hint} (give the prefix the build "
                            "printed after 'output', e.g. output/demo_text_document)")


def manifest_of(prefix: str) -> dict:
    path = prefix + MANIFEST
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def verify(prefix: str, tokenizer=None) -> dict:
    """Check every invariant; raise ``idxmap.LayoutError`` at the first violation. The figures
    returned include ``trainer``: what each trainer mode meets (``sftprep.trainer``)."""
    m = manifest_of(prefix)
    S = m.get("summary", {}).get("seq_length")
    pad = m.get("tokenizer", {}).get("pad_id")
    vocab = m.get("tokenizer", {}).get("vocab_size")
    if tokenizer is not None:
        pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    seen = trainer.figures()
    figures = idxmap.check_sft_layout(idxmap.IndexedReader(prefix), S, pad, vocab,
                                      also=lambda first, rows, S: trainer.check_rows(first, rows,
                                                                                     S, seen))
    return {**figures, "trainer": seen}


def sample_runs(row: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, list]]]:
    """A document's token ids, and per sample ``(first, last, runs)``; ``runs`` cut the sample's
    positions into ``(a, b, trained)`` stretches, ``b`` exclusive.

    A token is trained when the label before it predicts it (``labels[t-1] != -100``).
    """
    S = len(row) // 2
    inputs, labels = row[:S], row[S:]
    ids = np.where(inputs < 0, -1 - inputs, inputs)
    trained = np.zeros(S, dtype=bool)
    trained[1:] = labels[:-1] != idxmap.IGNORE_INDEX
    samples, start = [], 0
    for end in np.flatnonzero(inputs < 0):
        seg = trained[start:end + 1]
        cuts = [start, *(np.flatnonzero(np.diff(seg.astype(np.int8))) + 1 + start), end + 1]
        samples.append((start, int(end), [(int(a), int(b), bool(trained[a]))
                                          for a, b in zip(cuts, cuts[1:])]))
        start = end + 1
    return ids, samples


def describe_document(reader: idxmap.IndexedReader, k: int, tokenizer, color: bool) -> str:
    """Document ``k`` decoded: samples one by one, trained text marked, padding summarized."""
    row = np.asarray(reader.document(k))
    S = len(row) // 2
    ids, samples = sample_runs(row)
    used = samples[-1][1] + 1 if samples else 0
    open_, close = TRAINED if color else TRAINED_PLAIN
    out = [f"document {k}: {len(samples)} samples, {used} tokens, {S - used} pad "
           f"(trained text {open_}marked{close})"]
    for n, (first, last, runs) in enumerate(samples):
        spans = [f"{a}..{b - 1}" for a, b, t in runs if t]
        count = sum(b - a for a, b, t in runs if t)
        out.append(f"--- sample {n} (tokens {first}..{last}; {count} trained in "
                   f"{len(spans)} span{'s' * (len(spans) != 1)}: {', '.join(spans)})")
        text = []
        for a, b, t in runs:
            piece = tokenizer.decode(ids[a:b].tolist())
            text.append(f"{open_}{piece}{close}" if t else piece)
        out.append("".join(text))
    if used < S:
        out.append(f"--- padding: {S - used} x id {int(row[used])}")
    return "\n".join(out)


def document_html(reader: idxmap.IndexedReader, k: int, tokenizer) -> str:
    """Document ``k`` as ``describe_document`` shows it, for a notebook: trained text
    highlighted instead of marked."""
    row = np.asarray(reader.document(k))
    ids, samples = sample_runs(row)
    head = describe_document(reader, k, tokenizer, False).split("\n", 1)[0]
    head = head.replace(TRAINED_PLAIN[0], "").replace(TRAINED_PLAIN[1], "")
    parts = [f"<div><b>{html.escape(head)}</b>"]
    for n, (first, last, runs) in enumerate(samples):
        text = "".join((f'<mark style="background:#c8e6c9">{html.escape(piece)}</mark>' if t
                        else html.escape(piece))
                       for a, b, t in runs
                       for piece in [tokenizer.decode(ids[a:b].tolist())])
        parts.append(f"<div>sample {n} (tokens {first}..{last})</div>"
                     f'<pre style="white-space:pre-wrap">{text}</pre>')
    return "".join(parts) + "</div>"
