"""What people read: the progress line and the end-of-run summary (the manifest has the same)."""

from __future__ import annotations

from sftprep import trainer

PAD_ADVICE = 0.5  # without packing, a pad fraction above this gets the advice to pack


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def progress_line(p: dict) -> str:
    """Tokens per second would mislead here: a packer may hold a window of samples unwritten."""
    tasks = (f"{_n(p['read_tasks'])} of {_n(p['read_tasks_total'])} read tasks done, "
             if p.get("read_tasks_total") else "")
    return f"[sftprep] {p.get('seconds', 0):.0f}s: {tasks}{progress_figures(p)}"


def progress_figures(p: dict) -> str:
    return (f"{_n(p['records'])} records, {_n(p['samples'])} samples in; "
            f"{_n(p['documents'])} documents, {_n(p['tokens'])} tokens written")


def summary_text(manifest: dict) -> str:
    s = manifest["summary"]
    lines = [
        f"records read        {_n(s.get('records_read', s['records']))}"
        + (f" ({_n(s['records'])} selected)" if s.get("records_read", s["records"]) != s["records"]
           else ""),
        f"samples in          {_n(s['samples_in'])}",
        f"samples written     {_n(s['samples_written'])}",
        f"rejected records    {_n(s['rejected_records'])}" + _reasons(s["rejected_by_reason"]),
        f"dropped samples     {_n(s['dropped_samples'])}" + _reasons(s["dropped_by_reason"]),
        *_cut_lines(s),
        f"documents           {_n(s['documents'])} x 2*{s['seq_length']} int32",
        f"tokens              {_n(s['tokens'])} ({_n(s['trained_tokens'])} trained)",
        f"pad fraction        {s['pad_fraction']:.2%}",
        f"packing efficiency  {s['packing_efficiency']:.2%} "
        f"({s['samples_per_document_mean']} samples/document, max {s['samples_per_document_max']})",
    ]
    if len(s.get("sources", [])) > 1 or s.get("records_read", s["records"]) != s["records"]:
        lines.append(source_table(s["sources"]))
    if s.get("reasoning_carried"):
        lines.append(_reasoning_line(s))
    if s.get("bfd_documents") is not None and s["pad_fraction"] > PAD_ADVICE:
        lines.append(f"advice              {s['pad_fraction']:.0%} of the file is padding: "
                     f"--packing bfd would write {_n(s['bfd_documents'])} documents instead "
                     f"of {_n(s['documents'])};\n                    train those with the "
                     f"packed settings (MP_SFT_PACKING=true: {' '.join(trainer.PACKED_FLAGS)}, "
                     "micro-batch size 1)")
    if s.get("elapsed_seconds"):
        lines.append(f"time                {s['elapsed_seconds']:.1f}s, "
                     f"{s['tokens_per_second']:,} tokens/s "
                     f"(writer {s['writer_tokens_per_second'] or 0:,} tokens/s)")
    tok = manifest.get("tokenizer") or {}
    if tok.get("backend"):
        lines.append(f"tokenizer backend   {tok['backend']} ({tok['reason']})"
                     + (f"; chat template {tok['renderer']}" if tok.get("renderer") else "")
                     + ("; guard: identical" if tok.get("guard") else ""))
    if "trainer" in manifest:
        lines.append(f"trainer             {manifest['trainer']['summary']}")
        if manifest["trainer"].get("iterations"):
            lines.append("iterations          "
                         + trainer.iterations_line(manifest["trainer"]["iterations"]))
    shards = manifest.get("shards") or [{"prefix": manifest["files"]["bin"].rsplit(".", 1)[0],
                                          "files": manifest["files"]}]
    for k, shard in enumerate(shards):
        label = "output" if len(shards) == 1 else f"shard {k}"
        lines.append(f"{label:<20}{shard['prefix']} (.bin/.idx, verified)")
    for shard in shards:
        if "rejects" in shard["files"]:
            lines.append(f"not written/cut     {shard['files']['rejects']}")
    if len(shards) > 1:
        lines.append(f"--data-path         {manifest['data_path']}")
    return "\n".join(lines)


SOURCE_COLUMNS = (("read", "records_read"), ("selected", "records"),
                  ("samples", "samples_written"), ("tokens", "tokens"),
                  ("trained", "trained_tokens"), ("dropped", "dropped_samples"),
                  ("cut", "cut_samples"), ("rejected", "rejected_records"))


def source_table(sources: list[dict]) -> str:
    """The summary's figures per source (the manifest's ``summary.sources`` has them all)."""
    width = min(40, max(len("per source"), *(len(s["source"]) for s in sources)))
    out = [f"{'per source':<{width}}" + "".join(f" {name:>10}" for name, _ in SOURCE_COLUMNS)]
    for s in sources:
        name = s["source"] if len(s["source"]) <= width else "…" + s["source"][1 - width:]
        out.append(f"{name:<{width}}" + "".join(f" {_n(s[key]):>10}" for _, key in SOURCE_COLUMNS))
    return "\n".join(out)


def _cut_lines(s: dict) -> list[str]:
    """What cuts cost, per cut, in samples and tokens lost (each sample is in the rejects file)."""
    def cost(key: str) -> str:
        return f"{_n(s[key + '_samples'])} samples lost {_n(s[key + '_tokens_lost'])} tokens"

    truncated = cost("truncated")
    if s.get("overlong_dropped"):
        truncated += (f"; {_n(s['overlong_dropped'])} longer samples dropped "
                      f"({_n(s['overlong_dropped_tokens'])} tokens, --overlong drop)")
    safe = ("off (reference rows)" if not s.get("trainer_safe") else
            f"pad slot: {cost('pad_slot')}; ends on id 0: {cost('id_0')}"
            if s["pad_slot_samples"] or s["id_0_samples"] else "none")
    lines = [f"truncated at S      {truncated}", f"trainer-safe cuts   {safe}"]
    if s["cut_samples"]:
        lines.append(f"tokens lost         {_n(s['tokens_lost'])} in {_n(s['cut_samples'])} "
                     "cut samples (each in the rejects file with its tokens lost per cut)")
    return lines


def _reasoning_line(s: dict) -> str:
    """Reasoning texts the chat template left out, and what to do about them."""
    line = (f"reasoning           {_n(s['reasoning_carried'])} texts, "
            f"{_n(s['reasoning_not_rendered'])} not in the output")
    if s.get("reasoning_split"):
        line += f"; {_n(s['reasoning_split'])} turns trained as their own samples"
    if s["reasoning_not_rendered"] and not s.get("reasoning_split"):
        line += ("\n                    the chat template leaves them out (as at inference); "
                 "--reasoning-turns split trains each such turn as its own sample")
    return line


def _reasons(by: dict) -> str:
    return (" (" + ", ".join(f"{k}: {_n(v)}" for k, v in by.items()) + ")") if by else ""
