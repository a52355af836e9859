"""Small, deterministic SFT fixtures written by the tests (the repo ships no copy of public data)."""

from __future__ import annotations

import json
import random

TOPICS_EN = ["the water cycle", "binary search", "photosynthesis", "the French revolution",
             "compound interest", "TCP handshakes", "sourdough bread", "black holes"]
TOPICS_ZH = ["长城的历史", "二分查找", "光合作用", "复利的计算", "太阳系", "茶的种类"]


def alpaca_samples(n: int, seed: int = 0, long_every: int = 7) -> list[dict]:
    """``n`` Alpaca samples, English and Chinese, lengths from a few tokens to ~1,500."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        zh = i % 3 == 2
        topic = rnd.choice(TOPICS_ZH if zh else TOPICS_EN)
        reps = rnd.randint(1, 4) * (12 if i % long_every == 0 else 1)
        if zh:
            sample = {"instruction": f"请简要解释{topic}。", "input": "",
                      "output": "".join(f"第{k + 1}点：{topic}很重要，因为它影响我们的生活。"
                                        for k in range(reps))}
        else:
            sample = {"instruction": f"Explain {topic} to a student.",
                      "input": "Keep it short." if i % 2 else "",
                      "output": " ".join(f"Point {k + 1}: {topic} matters because it shapes "
                                         "how things work." for k in range(reps))}
        out.append(sample)
    return out


def lines_with_groups(samples: list[dict], group_every: int = 5) -> list:
    """Every ``group_every``-th line becomes a pre-packed list of three samples."""
    lines, i = [], 0
    while i < len(samples):
        if (len(lines) + 1) % group_every == 0 and i + 3 <= len(samples):
            lines.append(samples[i:i + 3])
            i += 3
        else:
            lines.append(samples[i])
            i += 1
    return lines


def write_jsonl(path, lines: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return str(path)


def record_batch(raw: list[bytes], end: bool = False):
    """Read-stage rows (``sources.SCHEMA``) of one task holding ``raw`` on lines 1, 2, ...;
    with ``end``, the task's end row too."""
    import pyarrow as pa
    from sftprep.sources import SCHEMA
    n = len(raw)
    return pa.table({"task": pa.array([0] * (n + end), pa.int32()),
                     "file": pa.array([0] * (n + end), pa.int32()),
                     "line": pa.array(list(range(1, n + 1)) + [n] * end, pa.int64()),
                     "element": pa.array([-1] * (n + end), pa.int32()),
                     "text": pa.array(list(raw) + [None] * end, pa.binary())}, schema=SCHEMA)
