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
    """Read-stage rows of one task holding ``raw`` on lines 1, 2, ...; with ``end``, the
    task's end row too."""
    from sftprep.sources import record_table
    rows = [(i + 1, -1, text) for i, text in enumerate(raw)]
    return record_table(0, 0, rows + [(len(raw), -1, None)] * end)
