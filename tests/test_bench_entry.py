"""``python -m bench``: every listed benchmark exists and can be run by name."""

from __future__ import annotations

import importlib

import pytest

from bench.__main__ import ROOT, SUITES, main


def test_every_listed_benchmark_exists(capsys):
    for entries in SUITES.values():
        for name in entries:
            if name.endswith(".sh"):
                assert (ROOT / "bench" / name).is_file()
            else:
                assert callable(importlib.import_module(f"bench.{name}").main), name
    assert main(["list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == sum(len(e) for e in SUITES.values())


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--only", "head_cpuu"])
    assert "head_cpuu" in capsys.readouterr().err
