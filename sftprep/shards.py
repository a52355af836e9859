"""``--shards N``: N ordered writers, each owning a contiguous range of the input.

The input is split by read task: read task ``t`` (its rows carry ``t`` in ``TASK_COLUMN``) goes
to the shard its middle byte falls in, so the shards are contiguous, in input order, and about
equally large by input bytes, whatever the number of workers or blocks. Shard ``k`` writes
``P_<k>_text_document.bin/.idx``; concatenated in order, the shards' documents are the unsharded
output's when nothing is packed across a shard boundary (``--packing none``).

Routing: a tokenizer block can hold rows of several read tasks (a batch spans blocks), so the
driver asks a zero-CPU task where the block lives for the block's first and last read task
(two integers, never the data) and hands the block reference to every writer owning one of
them; each writer keeps only its own rows.

Training on all shards: Megatron's ``--data-path`` (``megatron.core.datasets.utils.
get_blend_from_list``, used by Pai-Megatron-Patch's MMAP dataset) takes ``w1 p1 w2 p2 ...``;
``BlendedMegatronDatasetBuilder`` normalizes the weights and draws from each prefix in
proportion, so weighting each shard by its documents samples as the unsharded output would.
A shard with no documents (fewer read tasks than shards) is left out: a prefix with weight 0
would still be built as a dataset.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import pyarrow as pa

from sftprep import trainer
from sftprep.sink import MultipartSink
from sftprep.storage import is_remote

TASK_COLUMN = "task"  # the read task's identity in every row


def shard_of_tasks(task_bytes: list[int], shards: int) -> list[int]:
    """The shard of each read task, given each task's input bytes: non-decreasing, so every
    shard owns a contiguous range of tasks."""
    total = sum(task_bytes) or 1
    out, before = [], 0
    for size in task_bytes:
        out.append(min(shards - 1, (2 * before + size) * shards // (2 * total)))
        before += size
    return out


def task_ranges(task_shard: list[int], shards: int) -> list[tuple[int, int]]:
    """``(first, last)`` read task owned by each shard; ``(0, -1)`` for a shard with none."""
    ranges = []
    for k in range(shards):
        tasks = [t for t, s in enumerate(task_shard) if s == k]
        ranges.append((tasks[0], tasks[-1]) if tasks else (0, -1))
    return ranges


def task_reach(task_files: list[int], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(first, last)`` read task whose rows each shard must see: its own, and before them
    the earlier tasks of its first file, whose end rows give its lines their true numbers
    (the writer keeps only their end rows)."""
    out = []
    for lo, hi in ranges:
        first = lo
        while hi >= lo and first > 0 and task_files[first - 1] == task_files[lo]:
            first -= 1
        out.append((first, hi))
    return out


def task_span(block: pa.Table) -> tuple[int, int] | None:
    """The first and last read task of a block's rows (None for an empty block); the pipeline
    runs it as a zero-CPU task where the block lives."""
    if block.num_rows == 0:
        return None
    column = block[TASK_COLUMN]
    return column[0].as_py(), column[-1].as_py()


def shard_prefix(output_prefix: str, k: int) -> str:
    return f"{output_prefix}_{k}_text_document"


def unnamed_shards(output_prefix: str, manifest: dict, has_files: Callable[[str], bool]
                   ) -> list[str]:
    """The shard prefixes ``<output_prefix>_<k>_text_document`` (k = 0, 1, ... while
    ``has_files``) that ``manifest`` (the output's; {} when there is none) does not name.

    A sharded build publishes its shards, then the manifest naming them: the manifest is the
    commit point of the set, and shards no manifest names are left by a build that stopped
    before it, never an output."""
    named = {s["prefix"] for s in manifest.get("shards", [])}
    found, k = [], 0
    while has_files(shard_prefix(output_prefix, k)):
        if shard_prefix(output_prefix, k) not in named:
            found.append(shard_prefix(output_prefix, k))
        k += 1
    return found


def data_path_argument(shards: list[dict]) -> str:
    """Megatron's ``--data-path`` for all non-empty shards, each weighted by its documents."""
    return " ".join(f"{s['documents']} {s['prefix']}" for s in shards if s["documents"])


SETTINGS = ("seq_length",)  # numbers that are the build's settings, not counts: must agree


def merge_figures(parts: list):
    """One figure from the shards' (or sources') same figure, by one rule: numbers add up,
    except maxima (a key ending in ``_max``, or ``_seconds``: the parts ran side by side) and
    ``SETTINGS``; dicts merge key by key, lists item by item; anything else (a flag, a name, a
    setting) must agree. So a new figure cannot silently show one part's value."""
    return _merge(parts, "")


def _merge(parts: list, key: str):
    first = parts[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for p in parts for k in p))
        merged = {k: _merge([p[k] for p in parts if k in p], k) for k in keys}
        return dict(sorted(merged.items())) if key.endswith("_by_reason") else merged
    if isinstance(first, list):
        if len({len(p) for p in parts}) > 1:
            raise ValueError(f"{key!r}: the parts' lists differ in length")
        return [_merge(list(items), key) for items in zip(*parts)]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and key not in SETTINGS:
        return max(parts) if key.endswith(("_max", "_seconds")) else sum(parts)
    if any(p != first for p in parts):
        raise ValueError(f"{key!r}: the parts disagree ({parts!r}); no rule merges them")
    return first


_DERIVED = ("pad_fraction", "packing_efficiency", "samples_per_document_mean",
            "writer_tokens_per_second", "tokens_per_second")


def derive_figures(s: dict) -> dict:
    """The ratios of a summary, from its counts (after a merge, never merged themselves)."""
    s = {k: v for k, v in s.items() if k not in _DERIVED}
    docs, slots = s["documents"], s["documents"] * s["seq_length"]
    s["pad_fraction"] = round(1 - s["tokens"] / slots, 6) if slots else 0.0
    s["packing_efficiency"] = round(s["tokens"] / slots, 6) if slots else 0.0
    s["samples_per_document_mean"] = round(s["samples_written"] / docs, 3) if docs else 0.0
    s["writer_tokens_per_second"] = (round(s["tokens"] / s["writer_seconds"])
                                     if s["writer_seconds"] else None)
    if s.get("elapsed_seconds"):
        s["tokens_per_second"] = round(s["tokens"] / s["elapsed_seconds"])
    return s


def combine_summaries(summaries: list[dict], elapsed: float | None) -> dict:
    """One summary for the whole output from the shards' (``merge_figures``, then the ratios)."""
    out = merge_figures([{k: v for k, v in s.items() if k not in _DERIVED} for s in summaries])
    if elapsed:
        out["elapsed_seconds"] = elapsed
    return derive_figures(out)


def assemble_manifest(extra: dict, summaries: list[dict], figures: list[dict],
                      prefixes: list[str], outputs: list[dict], seq_length: int,
                      manifest_url: str, train: dict | None = None) -> dict:
    """The build's manifest from its writers' sealed summaries, trainer figures and files (one
    writer, or a shard each), the one place it is made. ``train``: ``trainer.section``'s
    epochs and global batch size."""
    summary = combine_summaries(summaries, extra.get("elapsed_seconds"))
    timing = {**extra.get("timing", {}), "cpu_seconds": summary.pop("cpu_seconds")}
    if len(summaries) == 1:
        data_path, files, shards = prefixes[0], outputs[0], {}
        figure = figures[0]
    else:
        listed = [{"prefix": prefix, "documents": s["documents"], "samples": s["samples_written"],
                   "tokens": s["tokens"], "files": files}
                  for prefix, s, files in zip(prefixes, summaries, outputs)]
        data_path, files, shards = (data_path_argument(listed), {"manifest": manifest_url},
                                    {"shards": listed})
        figure = trainer.combine(figures)
    return {**extra, "timing": timing, "summary": summary, "verified": True, **shards,
            "data_path": data_path,
            "trainer": trainer.section(figure, seq_length, data_path, **(train or {})),
            "files": files}


def write_manifest(url: str, manifest: dict, storage_options: dict | None,
                   spill_dir: str | None) -> None:
    """Write the manifest atomically: a temporary name then a rename, or one PUT."""
    data = json.dumps(manifest, indent=2, ensure_ascii=False).encode()
    if is_remote(url):
        with MultipartSink(url, storage_options, spill_dir) as sink:
            sink.write(data)
        return
    tmp = f"{url}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, url)
