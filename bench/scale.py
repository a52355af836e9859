"""Per-stage throughputs and the cluster size at which each stage becomes the bottleneck.

    python bench/scale.py                      # 20k records, S=2048, ~2 minutes
    python bench/scale.py --records 50000 --upload-mib 512

Each stage runs alone in this process on one core, on a corpus written from the demo files in
/work/shared/data (as bench.py does), and is expressed in bytes of JSONL input per second, so the
stages compare directly:

- read: ``sources.read_range`` over the whole file (one read task);
- tokenize: the ``Tokenize`` stage on those blocks (one actor = one core);
- writer: ``SFTWriter.consume``/``finish`` on the tokenized blocks (one shard), packing none and
  bfd;
- upload: ``sink.MultipartSink`` streaming to a loopback S3 server (moto in another process).

Model: with C tokenizer cores and N shards, the build runs at
``min(C * tokenize, N * writer, N * upload, reads)``; the tokenizer stage is the bottleneck
until ``C = N * min(writer, upload) / tokenize``. Read tasks are per input file (or byte range)
and take a tenth of a core, so they scale with the cluster; the store's bandwidth caps them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the loopback S3 server

from bench import (DATA, build_config, end_row, source_records, tokenized_blocks,  # noqa
                   write_corpus)

TB = 1e12
SHARDS = (1, 4, 16)


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure_read(path: str, block_records: int) -> dict:
    from sftprep.sources import ReadRange, read_range

    def run():
        return sum(b.num_rows for b in read_range(ReadRange(0, path), 0, {}, block_records))
    rows, wall, cpu = timed(run)
    return {"records": rows, "seconds": wall, "cpu_seconds": cpu}


def measure_writer(path: str, config, blocks, packing: str, out_dir: str) -> dict:
    from sftprep.template import load_tokenizer
    from sftprep.writer import SFTWriter

    tok = load_tokenizer(config.template.tokenizer)
    writer = SFTWriter(os.path.join(out_dir, f"w-{packing}_text_document"), [path],
                       config.template.seq_length, tok.pad_token_id, packing,
                       config.packing.window, "fail", {}, None, len(tok))

    def run():
        for b in blocks + [end_row()]:
            writer.consume(b)
        return writer.finish({})["summary"]
    s, wall, cpu = timed(run)
    out_bytes = s["documents"] * 2 * config.template.seq_length * 4
    return {"tokens": s["tokens"], "out_bytes": out_bytes, "seconds": wall, "cpu_seconds": cpu,
            "efficiency": s["packing_efficiency"]}


def _serve_s3(queue, stop):
    from object_store import s3_server
    with s3_server() as store:
        store.create_bucket("scale")
        queue.put(store.storage_options)
        stop.wait()


def measure_upload(mib: int, spill: str) -> dict:
    from sftprep.sink import MultipartSink

    queue, stop = multiprocessing.Queue(), multiprocessing.Event()
    server = multiprocessing.Process(target=_serve_s3, args=(queue, stop), daemon=True)
    server.start()
    try:
        options = queue.get(timeout=60)
        chunk = os.urandom(1 << 20)

        def run():
            with MultipartSink("s3://scale/big.bin", options, spill) as sink:
                for _ in range(mib):
                    sink.write(chunk)
        _, wall, cpu = timed(run)
    finally:
        stop.set()
        server.join(timeout=30)
    return {"bytes": mib << 20, "seconds": wall, "cpu_seconds": cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--upload-mib", type=int, default=256)
    p.add_argument("--data", default=DATA)
    args = p.parse_args(argv)
    from sftprep.demo import qwen_tokenizer_dir

    work = tempfile.mkdtemp(prefix="sftprep-scale-")
    path = os.path.join(work, "corpus.jsonl")
    write_corpus(path, source_records(args.data, "all"), args.records, seed=1)
    in_bytes = os.path.getsize(path)
    config = build_config(path, qwen_tokenizer_dir(), args.seq_length, "none",
                          os.path.join(work, "out"))

    read = measure_read(path, config.run.block_records)
    blocks, tok_wall, tok_cpu = timed(lambda: tokenized_blocks(path, config, args.records))
    tokens = sum(sum(b["tokens"].to_pylist()) for b in blocks)  # before any cut at S
    writers = {m: measure_writer(path, config, blocks, m, work) for m in ("none", "bfd")}
    upload = measure_upload(args.upload_mib, work)

    # Everything in bytes of JSONL input per second (per core, per shard, per task).
    rates = {
        "read (1 task)": in_bytes / read["cpu_seconds"],
        "tokenize (1 core)": in_bytes / tok_cpu,
        "writer none (1 shard)": in_bytes / writers["none"]["cpu_seconds"],
        "writer bfd (1 shard)": in_bytes / writers["bfd"]["cpu_seconds"],
    }
    out_per_in = {m: writers[m]["out_bytes"] / in_bytes for m in writers}
    upload_rate = upload["bytes"] / upload["seconds"]  # output bytes/s, bound by moto
    client_rate = upload["bytes"] / upload["cpu_seconds"]  # output bytes per CPU second

    print(f"corpus: {args.records:,} records, {in_bytes / 1e6:.1f} MB JSONL, "
          f"{tokens:,} tokens ({tokens / in_bytes:.3f} tokens/byte), S={args.seq_length}")
    print(f"output bytes per input byte: none {out_per_in['none']:.1f}, "
          f"bfd {out_per_in['bfd']:.2f} (efficiency {writers['bfd']['efficiency']:.1%})")
    print(f"upload: {upload_rate / 1e6:.0f} MB/s of output to loopback S3 (moto's own CPU is "
          f"the limit); the sink's client side: {client_rate / 1e6:,.0f} MB/s per CPU second")
    print()
    print("| stage | MB/s of JSONL input | tokens/s |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {r / 1e6:,.1f} | {r * tokens / in_bytes / 1e6:,.2f}M |")
    for m in ("none", "bfd"):
        r = upload_rate / out_per_in[m]
        print(f"| upload {m} to loopback S3 (1 shard) | {r / 1e6:,.1f} | "
              f"{r * tokens / in_bytes / 1e6:,.2f}M |")
    print()
    tok = rates["tokenize (1 core)"]
    print("| packing | shards | writers' cap, MB/s of input | store bandwidth needed, MB/s | "
          "tokenizer cores to reach the cap | 1 TB JSONL at the cap |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in ("none", "bfd"):
        for n in SHARDS:
            cap = n * rates[f"writer {m} (1 shard)"]
            print(f"| {m} | {n} | {cap / 1e6:,.0f} | {cap * out_per_in[m] / 1e6:,.0f} | "
                  f"{cap / tok:,.0f} | {TB / cap / 3600:,.1f} h |")
    print()
    print("1 TB JSONL with C tokenizer cores, below the writers' cap: " + ", ".join(
        f"{c} cores {TB / (c * tok) / 3600:,.1f} h" for c in (16, 64, 256, 1024)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
