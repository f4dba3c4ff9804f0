"""bench.layers_gpu run on a CPU with tiny widths (the GPU run has only the device and the kernels to add)."""

from __future__ import annotations

import json

import pytest

from bench import layers_gpu


@pytest.mark.parametrize(("activation", "norm"), [("silu", "llama"), ("gelu_pytorch_tanh", "gemma")])
def test_every_part_and_variant_is_measured(tmp_path, activation, norm):
    layers_gpu.main(["--device", "cpu", "--tokens", "37", "--hidden", "32", "--intermediate", "96", "--repeats", "2",
                     "--activation", activation, "--norm", norm, "--out", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "layers_gpu.json").read_text())["results"]
    assert len(results) == len(layers_gpu.PARTS) * len(layers_gpu.VARIANTS)
    assert all("error" not in r and len(r["times"]) == 2 and min(r["times"]) > 0 for r in results), results
    table = (tmp_path / "layers_gpu.md").read_text()
    assert table.count("| 37 | 32 | 96 |") == len(results) and "n/a (CPU)" in table
    assert f"RMSNorm ({norm} form), gated MLP ({activation})" in table
    assert (tmp_path / "layers_gpu.png").read_bytes().startswith(b"\x89PNG")
