from __future__ import annotations

import re
import subprocess
import sys


def test_demo_trains_with_both_heads_and_they_agree():
    args = ["--steps", "3", "--pairs", "2", "--seq-len", "24", "--vocab", "500"]
    done = subprocess.run([sys.executable, "-m", "fastdpo.demo", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "fastdpo fused head" in out and "full [tokens, vocab] logits" in out
    drift = float(re.search(r"largest loss difference between the two over all steps: (\S+)", out).group(1))
    # Same model and data through two implementations of the same math in fp32: differences are rounding only
    assert drift < 1e-4
    losses = re.findall(r"(\d+\.\d+)→(\d+\.\d+)", out)
    assert len(losses) == 2 and all(float(last) < float(first) for first, last in losses), out
