"""examples/: the DPO tutorial runs as shipped (embedded model and data, few steps), and its notebook matches it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_notebook_is_the_script():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from make_notebook import notebook
    finally:
        sys.path.remove(str(EXAMPLES))
    source = (EXAMPLES / "dpo_tutorial.py").read_text(encoding="utf-8")
    stored = json.loads((EXAMPLES / "dpo_tutorial.ipynb").read_text(encoding="utf-8"))
    assert stored == notebook(source), "run python examples/make_notebook.py"
    kinds = [cell["cell_type"] for cell in stored["cells"]]
    assert kinds.count("code") == 6 and stored["cells"][0]["source"][0].startswith("# DPO with fastdpo")


@pytest.mark.slow
def test_tutorial_script_runs_on_the_embedded_default(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "dpo_tutorial.py"), "--sft-steps", "15", "--dpo-steps", "6",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval_rewards/accuracies:" in done.stdout and "kl_estimate" in done.stdout
    assert (tmp_path / "dpo" / "config.json").is_file() and (tmp_path / "sft" / "tokenizer.json").is_file()
