"""Load regressions at CI size (``python -m bench.load_cpu`` runs 200k pairs and 500 steps; its results are in
bench/results/AMD_EPYC_2cpu/load_cpu.md): the data pipeline's peak memory against the size of the data, and the
resident memory over 300 tiny DPO steps.

Each is measured in a fresh process (``bench.load_cpu``'s workers), so what pytest and the other tests hold is not
counted. The two processes run side by side, one thread each (on two cores: about the time of the longer one;
a tiny model's step takes three times longer on two threads when another process wants a core).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.load_cpu import run_pipeline, run_steps

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for resident memory"),
]
MB = 10**6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with ThreadPoolExecutor(2) as pool:
        yield {
            # 10k pairs at a tenth of the bench's lengths (median words: prompt 7, completions 22): 3.2 MB of JSONL
            "pipeline": pool.submit(
                run_pipeline, 10_000, tmp_path_factory.mktemp("pipeline"), scale=0.1, threads=1, timeout=300
            ),
            "steps": pool.submit(run_steps, "dpo", tmp_path_factory.mktemp("steps"), steps=300, threads=1, timeout=300),
        }


def test_pipeline_peak_memory_stays_proportional_to_the_data(runs):
    result = runs["pipeline"].result()
    size, above = result["written"]["bytes"], result["peak_above_start_bytes"]
    # Peak RSS above the baseline (libraries imported, the pipeline warmed up on 64 rows; the kernel's high-water mark
    # is reset there), measured on 2 cores: 57 MB for these 3.2 MB of JSONL (67-73 MB for 20k pairs' 6.3 MB), 2,291 MB
    # for the bench's 557 MB (bench/results/AMD_EPYC_2cpu/load_cpu.md). Until 2026-11-26 the peak was the process's
    # whole-life high-water mark, which after the rest of the suite held a transient from before the baseline (924 MB
    # against a 590 MB start): the "fixed cost of a fresh environment" earlier notes could not pin down, and two CI
    # failures at 335-345 MB. The bar (4 GB at 200k pairs, less the 0.58 GB baseline) leaves 6.2 bytes per byte
    # of JSONL. Bound: 6.2 per byte, and 200 MB of slack. It fails on a cost of more than ~5 KB a pair, or on memory
    # growing faster than the data.
    assert above < 200 * MB + 6.2 * size, (
        f"the pipeline's peak RSS is {above / MB:.0f} MB above the imported libraries' for {size / MB:.0f} MB of "
        f"JSONL (RSS at the start {result['start_rss_bytes'] / MB:.0f} MB, the process's VmHWM "
        f"{result['ru_maxrss_bytes'] / MB:.0f} MB); peak per stage: "
        + ", ".join(f"{s['stage']}: {s['peak_sampled_bytes'] / MB:.0f} MB" for s in result["stages"])
    )
    dropped = sum(result["dropped_by_check"].values()) + sum(result["dropped_by_tokenize"].values())
    assert result["trained_pairs"] == result["rows"] - dropped
    assert result["epoch"]["batches"] == -(-result["trained_pairs"] // 8)


def test_resident_memory_stays_flat_over_300_dpo_steps(runs):
    growth = runs["steps"].result()["growth"]
    assert (growth["first_step"], growth["last_step"]) == (50, 300)
    # Measured from step 50 to 300 here and 50 to 500 in the bench: growth -6 to +2 MB, slope 1.5 to 6 KB a step (the
    # Trainer keeps each step's logged metrics). With a leak injected (run_steps(leak_bytes=)), 300 steps measured
    # +8.5 MB and 33 KB a step for 30 KB a step, +27 MB and 116 KB a step for 100 KB: the slope bound fails from
    # ~30 KB a step, the growth bound from ~60 KB.
    assert growth["growth_bytes"] < 15 * MB, growth
    assert growth["slope_bytes_per_step"] < 30_000, growth


def test_a_mistyped_path_is_named_with_the_file_meant(tmp_path, monkeypatch):
    # a local path the hub was then asked for ("pairs.jsonll", "pair"): datasets' own error about the hub came out,
    # which never said that no such local file exists
    import datasets

    from fastdpo.data import load_data
    from fastdpo.errors import DataError

    def hub(name, **options):
        raise datasets.exceptions.DatasetNotFoundError(
            f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed."
        )

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(
        DataError, match=r"pairs.jsonll: no file or folder of that name in .*DatasetNotFoundError"
    ) as error:
        load_data("pairs.jsonll")
    assert error.value.fix == "did you mean pairs.jsonl?"
    with pytest.raises(DataError) as error:
        load_data("elsewhere")
    assert "check the path (a data file with its suffix: .jsonl" in error.value.fix
