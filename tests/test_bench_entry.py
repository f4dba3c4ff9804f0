"""``python -m bench``: every listed benchmark exists and can be run by name."""

from __future__ import annotations

import importlib

import pytest

from bench.__main__ import ROOT, SUITES, _command, main


def test_every_listed_benchmark_exists(capsys):
    for entries in SUITES.values():
        for name in entries:
            if name.endswith(".sh"):
                assert (ROOT / "bench" / name).is_file()
            else:  # (its module, and the arguments its entry passes parse)
                command = _command(name)
                module = importlib.import_module(command[2])
                assert callable(module.main), name
                parsed = _parsed(module, command[3:])
                assert parsed is None or not getattr(parsed, "worker", None), name
    assert main(["list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == sum(len(e) for e in SUITES.values())


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--only", "head_cpuu"])
    assert "head_cpuu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the GPU suite's script under the default suite (cpu): it ran nothing, exit 0
        main(["run", "--only", "gpu.sh"])
    assert "gpu.sh not in the cpu suite: add --suite gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a name of each suite: both suites
        main(["run", "--only", "gpu.sh", "head_cpu", "--suite", "gpu"])
    assert "head_cpu not in the gpu suite: add --suite all" in capsys.readouterr().err


def _parsed(module, arguments: list[str]):
    """``module.main``'s parse of ``arguments`` (its parser stopped before any work: a SystemExit on --help)."""
    if not arguments:
        return None
    import argparse

    seen, original = {}, argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        seen["args"] = original(self, args, namespace)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = stop
    try:
        with pytest.raises(SystemExit):
            module.main(arguments)
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen["args"]
