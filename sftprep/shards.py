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
from collections import Counter
from typing import Callable

import pyarrow as pa
import ray

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


@ray.remote(num_cpus=0)
def task_span(block: pa.Table) -> tuple[int, int] | None:
    """The first and last read task of a block's rows (None for an empty block)."""
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


_SUMMED = ("records", "samples_in", "samples_written", "rejected_records", "dropped_samples",
           "truncated_samples", "tokens_cut", "trainer_cut_samples", "trainer_tokens_cut",
           "documents", "tokens", "trained_tokens")


def combine_summaries(summaries: list[dict], elapsed: float | None) -> dict:
    """One summary for the whole output from the shards' (counts add up; ratios recomputed)."""
    out = dict(summaries[0])
    for key in _SUMMED:
        out[key] = sum(s[key] for s in summaries)
    for key in ("rejected_by_reason", "dropped_by_reason", "trainer_cut_by_reason"):
        total = sum((Counter(s[key]) for s in summaries), Counter())
        out[key] = dict(sorted(total.items()))
    if "bfd_documents" in out:  # each shard packs its own samples: the sum of theirs
        out["bfd_documents"] = sum(s["bfd_documents"] for s in summaries)
    docs, slots = out["documents"], out["documents"] * out["seq_length"]
    out["pad_fraction"] = round(1 - out["tokens"] / slots, 6) if slots else 0.0
    out["packing_efficiency"] = round(out["tokens"] / slots, 6) if slots else 0.0
    out["samples_per_document_mean"] = (round(out["samples_written"] / docs, 3) if docs
                                        else 0.0)
    out["samples_per_document_max"] = max(s["samples_per_document_max"] for s in summaries)
    out["writer_seconds"] = max(s["writer_seconds"] for s in summaries)  # they run side by side
    out["writer_tokens_per_second"] = (round(out["tokens"] / out["writer_seconds"])
                                       if out["writer_seconds"] else None)
    if elapsed:
        out["elapsed_seconds"] = elapsed
        out["tokens_per_second"] = round(out["tokens"] / elapsed)
    return out


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
