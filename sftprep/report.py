"""What people read: the progress line and the end-of-run summary (the manifest has the same)."""

from __future__ import annotations

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
        f"records read        {_n(s['records'])}",
        f"samples in          {_n(s['samples_in'])}",
        f"samples written     {_n(s['samples_written'])}",
        f"rejected records    {_n(s['rejected_records'])}" + _reasons(s["rejected_by_reason"]),
        f"dropped samples     {_n(s['dropped_samples'])}" + _reasons(s["dropped_by_reason"]),
        f"truncated samples   {_n(s['truncated_samples'])} ({_n(s['tokens_cut'])} tokens cut)",
        "trainer-safe cuts   " + (f"{_n(s['trainer_cut_samples'])} samples "
                                   f"({_n(s['trainer_tokens_cut'])} tokens cut)"
                                   + _reasons(s["trainer_cut_by_reason"])
                                   if s.get("trainer_safe") else "off (reference rows)"),
        f"documents           {_n(s['documents'])} x 2*{s['seq_length']} int32",
        f"tokens              {_n(s['tokens'])} ({_n(s['trained_tokens'])} trained)",
        f"pad fraction        {s['pad_fraction']:.2%}",
        f"packing efficiency  {s['packing_efficiency']:.2%} "
        f"({s['samples_per_document_mean']} samples/document, max {s['samples_per_document_max']})",
    ]
    if s.get("bfd_documents") is not None and s["pad_fraction"] > PAD_ADVICE:
        lines.append(f"advice              {s['pad_fraction']:.0%} of the file is padding: "
                     f"--packing bfd would write {_n(s['bfd_documents'])} documents instead "
                     f"of {_n(s['documents'])};\n                    train those with the "
                     "packed settings (MP_SFT_PACKING=true, --reset-position-ids, "
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


def _reasons(by: dict) -> str:
    return (" (" + ", ".join(f"{k}: {_n(v)}" for k, v in by.items()) + ")") if by else ""
