"""examples/quickstart.ipynb runs headless in a real Jupyter kernel, so it never rots: its
outputs hold the statistics' figure (a PNG), the build's summary, and one document with its
trained tokens highlighted, and no stderr noise from Ray, tqdm or transformers."""

from __future__ import annotations

import os

import pytest

from test_jobs import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))  # the kernel imports this tree
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    data = [o.get("data", {}) for o in outputs]
    assert any("image/png" in d for d in data)  # the token-length histogram, inline
    summary = [d["text/plain"] for d in data if "packing efficiency" in d.get("text/plain", "")]
    assert summary and "documents" in summary[0] and "(.bin/.idx, verified)" in summary[0]
    assert "per source" in summary[0] and "#150" in summary[0]  # the mixture's table
    assert any("<mark" in d.get("text/html", "") for d in data)  # inspect: trained tokens
    bar = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "[sftprep] read tasks" in bar and "3/3" in bar  # the chats' two passes: 2 tasks
    noise = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert noise == []
    assert os.path.exists(tmp_path / "output" / "quickstart_text_document.bin")
