"""What Pai-Megatron-Patch's SFT trainer accepts, per mode, checked over the rows of an output.

The trainer reads every document through Megatron-LM's ``GPTDataset`` (which rewrites the value
-1, its pad sentinel, to 0) and Pai's ``get_batch``. Two modes (docs/trainer.md has the reading):

- ``packed`` (``MP_SFT_PACKING=true``, i.e. ``--reset-position-ids``): position ids restart after
  every negative input; ``get_batch`` needs at least two restarts in the first row of a
  micro-batch (else it takes the max of an empty list) and builds the attention segments
  (cu_seqlens) from that first row only, so micro-batch size 1; the per-sample loss average
  asserts that every sample has a trained label.
- ``unpacked``: one causal mask over the whole row and one loss average per row, so a row that
  holds several samples trains them attending to each other (silently), and a row needs a
  trained label.

``check_rows`` counts what breaks each mode (and the first document that does);
``verdict`` says which modes are safe; ``section`` is the manifest's ``trainer`` entry.
"""

from __future__ import annotations

import numpy as np

from sftprep.idxmap import IGNORE_INDEX, LayoutError

GPT_DATASET_PAD = -1  # Megatron GPTDataset's pad sentinel when the tokenizer has no `pad`

# rule -> (the mode it breaks, what happens to a document breaking it); figures[rule] counts the
# documents, figures["first"][rule] is the first of them
RULES = {
    "full_rows": ("packed", "its only sample fills all S inputs with no pad after it: packed "
                  "get_batch finds one segment and fails (max() of an empty list)"),
    "erased_boundaries": ("packed", "a sample ends on token id 0, stored as -1, which GPTDataset "
                          "rewrites to 0 as its pad sentinel: the sample boundary vanishes"),
    "untrained_samples": ("packed", "a sample has no trained label: packed get_batch asserts "
                          "while averaging the loss per sample"),
    "packed_documents": ("unpacked", "it holds more than one sample: without MP_SFT_PACKING=true "
                         "they attend to each other and share one loss average"),
    "untrained_documents": ("unpacked", "it has no trained label: the loss average divides by 0"),
}
MODES = ("packed", "unpacked")
MODE_NAMES = {"packed": "MP_SFT_PACKING=true (micro-batch size 1)",
              "unpacked": "MP_SFT_PACKING=false"}
EPOCHS = 1
GLOBAL_BATCH_SIZE = 8  # Pai's SFT examples (run_mcore_*.sh with SFT=true)
WARMUP_PER_ITERS = 100  # one warm-up iteration per 100, as Pai's SFT example (100 of 10,000)


def figures() -> dict:
    return {"documents": 0, "max_samples_per_document": 0, **{r: 0 for r in RULES}, "first": {}}


def combine(parts: list[dict]) -> dict:
    """The figures of outputs read one after another (shards in order): counts add up, and
    document numbers run on across them."""
    t, offset = figures(), 0
    for part in parts:
        for key, value in part.items():
            if key == "first":
                for rule, doc in value.items():
                    t["first"].setdefault(rule, offset + doc)
            elif key == "max_samples_per_document":
                t[key] = max(t[key], value)
            else:
                t[key] += value
        offset += part["documents"]
    return t


def check_rows(first: int, rows: np.ndarray, S: int, t: dict) -> None:
    """Add documents ``first, first+1, ...`` (``rows[k, 2S]``, layout already checked) to ``t``."""
    inputs, trained = rows[:, :S], rows[:, S:] != IGNORE_INDEX
    markers = inputs < 0
    samples = markers.sum(axis=1)
    untrained_documents = ~trained.any(axis=1)
    # A one-sample row's sample is untrained exactly when the row is (the layout check allows
    # no trained label after the last boundary); only rows of several samples need the count
    # per sample, which would otherwise be most of this check's time without packing.
    untrained_samples = untrained_documents.copy()
    multi = samples > 1
    if multi.any():
        untrained_samples[multi] = _untrained_sample(markers[multi], trained[multi],
                                                     samples[multi], S)
    bad = {
        "full_rows": ~markers[:, :-1].any(axis=1),
        "erased_boundaries": (inputs == GPT_DATASET_PAD).any(axis=1),
        "untrained_samples": untrained_samples,
        "packed_documents": multi,
        "untrained_documents": untrained_documents,
    }
    for rule, rows_bad in bad.items():  # counted in documents
        n = int(rows_bad.sum())
        t[rule] += n
        if n and rule not in t["first"]:
            t["first"][rule] = first + int(np.argmax(rows_bad))
    k = len(rows)
    t["documents"] += k
    if k:
        t["max_samples_per_document"] = max(t["max_samples_per_document"], int(samples.max()))


def _untrained_sample(markers: np.ndarray, trained: np.ndarray, samples: np.ndarray,
                      S: int) -> np.ndarray:
    """Per row: whether one of its samples (segment j = the inputs after j boundaries) has no
    trained label."""
    segment = np.cumsum(markers, axis=1, dtype=np.int32) - markers
    k = len(markers)
    key = (np.arange(k)[:, None] * (S + 1) + segment)[trained]
    per_segment = np.bincount(key, minlength=k * (S + 1)).reshape(k, S + 1)
    is_sample = np.arange(S + 1)[None, :] < samples[:, None]
    return ((per_segment == 0) & is_sample).any(axis=1)


def verdict(t: dict) -> dict:
    """``{mode: None if safe, else "document K: why"}`` for the earliest document breaking it."""
    out = {}
    for mode in MODES:
        broken = [(t["first"][r], why) for r, (m, why) in RULES.items()
                  if m == mode and r in t["first"]]
        out[mode] = "document {}: {}".format(*min(broken)) if broken else None
    return out


def iterations(documents: int, epochs: int = EPOCHS,
               global_batch_size: int = GLOBAL_BATCH_SIZE) -> dict:
    """``TRAIN_ITERS`` and a warm-up for Pai's run script with ``SFT=true``, which takes both as
    iterations (its 25th and 26th arguments) and decays over the rest.

    One document is one training sample (Pai doubles the dataset's sequence length to 2*S), and
    Megatron draws ``TRAIN_ITERS * GLOBAL_BATCH_SIZE`` of them, cycling through the documents in
    a new shuffle each epoch; so ``ceil(documents * epochs / GBS)`` iterations see every document
    ``epochs`` times, the last batch topping up from the next shuffle (docs/trainer.md). The
    warm-up is one iteration per ``WARMUP_PER_ITERS``, at most what leaves Megatron a longer
    decay (it requires warm-up < decay = TRAIN_ITERS - warm-up)::

        iterations(9_870)  # {'TRAIN_ITERS': 1234, 'LR_WARMUP_ITERS': 13, ...}
    """
    train = -(-documents * epochs // global_batch_size)
    warmup = max(0, min(-(-train // WARMUP_PER_ITERS), (train - 1) // 2))
    return {"TRAIN_ITERS": train, "LR_WARMUP_ITERS": warmup, "LR_DECAY_ITERS": train - warmup,
            "GLOBAL_BATCH_SIZE": global_batch_size, "epochs": epochs, "documents": documents}


# What Pai's run scripts add for MP_SFT_PACKING=true (docs/trainer.md's table says the same;
# tests/test_trainer.py holds the two together).
PACKED_FLAGS = ("--reset-position-ids", "--no-create-attention-mask-in-dataloader")


def settings(t: dict, S: int, data_path: str, epochs: int = EPOCHS,
             global_batch_size: int = GLOBAL_BATCH_SIZE) -> dict:
    """The settings to train with: Pai's run script variables and the Megatron flags they set."""
    v = verdict(t)
    packed = v["packed"] is None and (t["packed_documents"] or v["unpacked"] is not None)
    if v["packed"] is not None and v["unpacked"] is not None:
        return {"safe": False}
    it = iterations(t["documents"], epochs, global_batch_size)
    common = {"SFT": "true", "MP_DATASET_TYPE": "mmap", "SEQ_LEN": S, "DATASET_PATH": data_path,
              "GLOBAL_BATCH_SIZE": global_batch_size, "TRAIN_ITERS": it["TRAIN_ITERS"],
              "LR_WARMUP_ITERS": it["LR_WARMUP_ITERS"]}
    schedule = [f"--global-batch-size {global_batch_size}", f"--train-iters {it['TRAIN_ITERS']}",
                f"--lr-warmup-iters {it['LR_WARMUP_ITERS']}",
                f"--lr-decay-iters {it['LR_DECAY_ITERS']}"]
    if packed:
        return {"safe": True, "MP_SFT_PACKING": "true", "BATCH_SIZE": 1, "CP": 1, **common,
                "flags": ["--dataset MMAP", "--train-mode finetune", *PACKED_FLAGS,
                          "--micro-batch-size 1", f"--seq-length {S}", f"--data-path {data_path}",
                          *schedule]}
    return {"safe": True, "MP_SFT_PACKING": "false", **common,
            "flags": ["--dataset MMAP", "--train-mode finetune", f"--seq-length {S}",
                      f"--data-path {data_path}", *schedule]}


def section(t: dict, S: int, data_path: str, epochs: int = EPOCHS,
            global_batch_size: int = GLOBAL_BATCH_SIZE) -> dict:
    """The manifest's ``trainer`` entry."""
    return {"packed_documents": t["packed_documents"],
            "max_samples_per_document": t["max_samples_per_document"],
            "rows_breaking": {r: t[r] for r in RULES},
            "first_document_breaking": dict(sorted(t["first"].items())),
            "safe_modes": [m for m, why in verdict(t).items() if why is None],
            "problems": {m: why for m, why in verdict(t).items() if why},
            "iterations": iterations(t["documents"], epochs, global_batch_size),
            "train_with": settings(t, S, data_path, epochs, global_batch_size),
            "summary": line(t, S, data_path)}


def iterations_line(it: dict) -> str:
    """For people: the two numbers Pai's run script takes with SFT=true, and where they come
    from."""
    epochs = f"{it['epochs']} epoch{'s' * (it['epochs'] != 1)}"
    return (f"TRAIN_ITERS {it['TRAIN_ITERS']:,}, warm-up {it['LR_WARMUP_ITERS']:,} "
            f"({epochs} of {it['documents']:,} documents at GLOBAL_BATCH_SIZE "
            f"{it['GLOBAL_BATCH_SIZE']}; --epochs, --global-batch-size)")


def line(t: dict, S: int, data_path: str) -> str:
    """One line for people: packed or not, and how to train (or why no mode is safe)."""
    v = verdict(t)
    multi = (f"{t['packed_documents']:,} of {t['documents']:,} documents hold several samples"
             if t["packed_documents"] else "one sample per document")
    s = settings(t, S, data_path)
    if not s["safe"]:
        return f"{multi}; NO trainer mode is safe: packed {v['packed']}; unpacked {v['unpacked']}"
    if s["MP_SFT_PACKING"] == "true":
        how = (f"train with MP_SFT_PACKING=true ({' '.join(PACKED_FLAGS)}), micro-batch size 1, "
               f"--seq-length {S}, --data-path {data_path}")
        if not t["packed_documents"]:
            how += " (packing off fails: " + v["unpacked"] + ")"
        return f"{multi}; {how}"
    how = f"train with --seq-length {S}, --data-path {data_path}, MP_SFT_PACKING=false"
    if v["packed"] is None:
        how += " (any micro-batch size) or true (micro-batch size 1)"
    else:
        how += f" (MP_SFT_PACKING=true fails at {v['packed']})"
    return f"{multi}; {how}"


def modes_text(t: dict) -> str:
    """For ``verify``: the modes the files are safe for, and the first document each other
    mode fails at."""
    v = verdict(t)
    safe = [MODE_NAMES[m] for m in MODES if v[m] is None]
    text = "safe for " + " and ".join(safe) if safe else "safe for no mode"
    return "; ".join([text] + [f"not {MODE_NAMES[m]}: {v[m]}" for m in MODES if v[m]])


def require(t: dict, mode: str = "any") -> None:
    """Raise ``LayoutError`` unless the files are safe for ``mode`` (``any``: for some mode)."""
    v = verdict(t)
    if mode == "any" and all(v.values()):
        raise LayoutError("no trainer mode reads these files correctly: " + "; ".join(
            f"{MODE_NAMES[m]}: {v[m]}" for m in MODES))
    if mode != "any" and v[mode]:
        raise LayoutError(f"not safe for {MODE_NAMES[mode]}: {v[mode]}")
