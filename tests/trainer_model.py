"""Our own model of how Pai-Megatron-Patch trains on a document, for tests only.

Written from reading (not copying) Megatron-LM ``megatron/core/datasets/gpt_dataset.py`` at
6a6cd478 and Pai-Megatron-Patch ``megatron_patch/data/utils.py``, ``megatron_patch/template/
helper.py``, ``megatron_patch/data/__init__.py`` at a098ca5; docs/trainer.md says what they do.
sftprep's code is not used here. numpy stands in for torch; where the trainer would raise, this
raises ``TrainerError`` saying what the trainer would have done.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
GPT_DATASET_SENTINEL = -1  # Pai's tokenizers have no `pad`, so GPTDataset pads with -1


class TrainerError(RuntimeError):
    """Where the real trainer raises (or trains on a NaN loss)."""


def dataset_row(doc: np.ndarray) -> np.ndarray:
    """What GPTDataset hands on for one 2*S document: every -1 becomes 0 (its pad sentinel)."""
    row = np.asarray(doc, dtype=np.int64).copy()
    row[row == GPT_DATASET_SENTINEL] = 0
    return row


def reset_positions(tokens: np.ndarray) -> np.ndarray:
    """Position ids that count from 0 again after every negative input (packed mode)."""
    t = np.arange(tokens.shape[1])
    restart = np.zeros(tokens.shape, dtype=bool)
    restart[:, 1:] = tokens[:, :-1] < 0           # a new sample starts after a boundary
    start = np.maximum.accumulate(np.where(restart, t, 0), axis=1)
    return t - start


def get_batch(docs: list[np.ndarray], S: int, packed: bool) -> dict:
    """One micro-batch (one document a row) through the SFT batch path of the trainer."""
    rows = np.stack([dataset_row(d) for d in docs])
    if rows.shape[1] != 2 * S:
        raise TrainerError(f"row of {rows.shape[1]} values, the trainer asserts 2*S = {2 * S}")
    tokens, labels = rows[:, :S].copy(), rows[:, S:]
    loss = (labels != IGNORE).astype(np.float64)
    if packed:
        positions = reset_positions(tokens)
        ends_in_pad = tokens[:, -1] >= 0
    else:
        positions = np.tile(np.arange(S), (len(rows), 1))
    tokens = np.where(tokens < 0, -1 - tokens, tokens)
    segments_per_row = []
    if packed:
        num_seqs = []
        for b in range(len(rows)):
            starts = np.flatnonzero(positions[b] == 0)
            ends = np.r_[starts[1:], S]
            real = len(starts) - int(ends_in_pad[b])  # the trailing pad segment is skipped
            for i, (a, e) in enumerate(zip(starts, ends)):
                if i == real:
                    continue
                total = loss[b, a:e].sum()
                if total == 0:
                    raise TrainerError(f"row {b}: sample at {a}..{e - 1} has no trained label "
                                       "(the per-sample loss average asserts)")
                loss[b, a:e] /= total
            num_seqs.append(real)
            segments_per_row.append(list(zip(starts.tolist(), ends.tolist())))
        # Attention segments: built from the first row of the micro-batch, for every row.
        starts = np.flatnonzero(positions[0] == 0)
        lengths = np.diff(starts)
        if lengths.size == 0:
            raise TrainerError("max() of an empty tensor: the first row has a single segment")
        cu_seqlens = np.r_[0, np.cumsum(lengths), S]
    else:
        totals = loss.sum(axis=1, keepdims=True)
        if np.any(totals == 0):
            raise TrainerError("a row with no trained label: the loss average is NaN")
        loss = loss / totals
        num_seqs = [1] * len(rows)
        cu_seqlens = None
        segments_per_row = [[(0, S)] for _ in rows]
    return {"tokens": tokens, "labels": labels, "loss_mask": loss, "position_ids": positions,
            "cu_seqlens": cu_seqlens, "num_seqs": np.array(num_seqs),
            "segments": segments_per_row}


def samples_of(doc: np.ndarray, S: int) -> list[tuple[int, int]]:
    """The samples the build wrote into a document: ``(first, last)`` positions, from its
    negative inputs as stored (before GPTDataset touches them)."""
    ends = np.flatnonzero(np.asarray(doc[:S]) < 0)
    return list(zip(np.r_[0, ends[:-1] + 1].tolist(), ends.tolist()))


def trains_right(doc: np.ndarray, S: int, packed: bool) -> None:
    """Raise ``TrainerError`` unless the trainer reads ``doc`` (alone in its micro-batch) with
    attention and loss per sample exactly as built: every boundary intact, no sample attending
    to another, every sample's loss averaged on its own."""
    batch = get_batch([doc], S, packed)
    built = samples_of(doc, S)
    attention = [(a, e - 1) for a, e in (batch["cu_seqlens"][i:i + 2] for i in
                 range(len(batch["cu_seqlens"]) - 1))] if packed else [(0, S - 1)]
    spans = [(a, b) for a, b in attention if any(a <= s <= b for s, _ in built)]
    if packed:
        if spans != built:
            raise TrainerError(f"boundaries seen {spans}, built {built}")
    elif len(built) > 1:
        raise TrainerError(f"{len(built)} samples in one causal row attend to each other")
    if int(batch["num_seqs"][0]) != (len(built) if packed else 1):
        raise TrainerError(f"num_seqs {batch['num_seqs'][0]} for {len(built)} samples")
    ids = batch["tokens"][0]
    stored = np.asarray(doc[:S], dtype=np.int64)
    if not np.array_equal(ids, np.where(stored < 0, -1 - stored, stored)):
        raise TrainerError("token ids changed on the way in")
