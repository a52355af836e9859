"""An independent implementation of the output contract (``pai-sft-layout.md``), for tests only.

It follows the reference tool step by step: per-sample ``apply_chat_template`` (prompt and full),
drop / truncate, labels, the negated last id, greedy packing, and it lays out the .idx bytes with
``struct`` from the table in the contract. sftprep's code is not used here.
"""

from __future__ import annotations

import struct

import numpy as np


def _ids(tok, conversation) -> list[int]:
    out = tok.apply_chat_template(conversation)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_group(tok, group: list[dict], S: int, pad_id: int) -> list[list[int]]:
    """The reference's ``Encoder.encode`` for one group: documents as lists of 2*S values."""
    docs, doc_ids, label_ids, used = [], [], [], 0
    for data in group:
        text = [{"role": "user", "content": data["instruction"] + (data.get("input") or "")},
                {"role": "assistant", "content": data["output"]}]
        input_ids = _ids(tok, text[:-1])
        if len(input_ids) >= S:
            continue
        all_ids = _ids(tok, text)
        if len(all_ids) >= S:
            all_ids = all_ids[:S]
        assert all_ids[:len(input_ids)] == input_ids
        y_ids = [-100] * (len(input_ids) - 1) + all_ids[len(input_ids):] + [-100]
        all_ids[-1] = -1 - all_ids[-1]
        if used + len(all_ids) > S:
            docs.append(doc_ids + [pad_id] * (S - used) + label_ids + [-100] * (S - used))
            doc_ids, label_ids, used = [], [], 0
        doc_ids += all_ids
        label_ids += y_ids
        used += len(all_ids)
    if used:
        docs.append(doc_ids + [pad_id] * (S - used) + label_ids + [-100] * (S - used))
    return docs


def build_bytes(tok, lines: list, S: int, pad_id: int, sequence_packing: bool) -> tuple[bytes, bytes]:
    """Expected ``(.bin, .idx)`` bytes for JSONL ``lines`` (dicts or lists of dicts)."""
    groups = [line if isinstance(line, list) else [line] for line in lines]
    if sequence_packing:
        groups = [[s for g in groups for s in g]]
    docs = [d for g in groups for d in encode_group(tok, g, S, pad_id)]
    n = len(docs)
    data = np.asarray(docs, dtype="<i4").reshape(n, 2 * S)
    idx = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 4, n, n + 1)
    idx += np.full(n, 2 * S, "<i4").tobytes()
    idx += (np.arange(n, dtype="<i8") * 2 * S * 4).tobytes()
    idx += np.arange(n + 1, dtype="<i8").tobytes()
    return data.tobytes(), idx
