"""Local data files beyond plain JSON Lines, JSON, Parquet and CSV: compressed ones (``.gz``, ``.bz2``, ``.xz``, as
HH-RLHF ships ``train.jsonl.gz``) and tab-separated ones (``.tsv``), read as their plain forms are, in a table and
as a stream, on their own, in a folder of splits and in a mixture."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import warnings

import datasets
import pytest

from fastdpo.data.load import load_data, load_stream
from fastdpo.data.mixture import load_mixture, parts_of
from fastdpo.errors import DataError

datasets.disable_progress_bars()
ROWS = [{"prompt": f"question {i}, in words", "chosen": "007", "rejected": "NA", "score": i} for i in range(7)]
JSONL = "".join(json.dumps(row) + "\n" for row in ROWS)
TSV = "prompt\tchosen\trejected\tscore\n" + "".join("\t".join(str(v) for v in row.values()) + "\n" for row in ROWS)
CSV = "prompt,chosen,rejected,score\n" + "".join(f'"{r["prompt"]}",007,NA,{r["score"]}\n' for r in ROWS)
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """datasets' cache (where decompressed copies go) in the test's folder."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder))
    return folder


def write(folder, name, text: str):
    path = folder / name
    suffix = path.suffix.lower()
    path.write_bytes(COMPRESS[suffix](text.encode()) if suffix in COMPRESS else text.encode())
    return path


@pytest.mark.parametrize(
    "name, text",
    [
        ("pairs.jsonl.gz", JSONL),
        ("pairs.jsonl.bz2", JSONL),
        ("pairs.json.xz", json.dumps(ROWS)),
        ("pairs.ndjson", JSONL),
        ("pairs.tsv", TSV),
        ("pairs.TSV.GZ", TSV),
        ("pairs.csv.gz", CSV),
    ],
)
def test_compressed_and_tab_separated_files_load_as_their_plain_forms(tmp_path, name, text):
    path = write(tmp_path, name, text)
    # the text columns as written ("007", "NA": pandas would read 7 and a missing value), the score a number
    assert load_data(path).to_list() == ROWS
    assert list(load_stream(path)) == ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", name]  # (nothing written beside the file)


def test_a_broken_line_in_a_compressed_file_is_named_by_the_file_and_its_line(tmp_path):
    path = write(tmp_path, "pairs.jsonl.gz", JSONL + '{"prompt": oops}\n' + JSONL)
    with pytest.raises(DataError, match=r"^.*pairs\.jsonl\.gz: line 8: invalid JSON") as loading:
        load_data(path)
    assert "fastdpo_decompressed" not in str(loading.value)
    with pytest.raises(DataError, match=r"pairs\.jsonl\.gz: line 8: invalid JSON"):
        list(load_stream(path))
    tsv = write(tmp_path, "pairs.tsv.gz", "prompt\tchosen\tprompt\nq\ta\tb\n")
    with pytest.raises(DataError, match=r"pairs\.tsv\.gz: the header names 'prompt' twice"):
        load_data(tsv)


@pytest.mark.parametrize(
    "content, said",
    [
        (gzip.compress(JSONL.encode())[:-12], "EOFError"),  # cut short (a download stopped)
        (JSONL.encode(), "BadGzipFile"),  # plain text under a .gz name
    ],
)
def test_a_file_that_does_not_decompress_is_refused_naming_it(tmp_path, cache, content, said):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"pairs\.jsonl\.gz: cannot decompress it as \.gz \({said}.*download"):
        load_data(path)
    # no half copy is left to be read the next time
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_the_copy_is_made_once_per_version_of_the_file(tmp_path, cache):
    path = write(tmp_path, "pairs.jsonl.gz", JSONL)
    assert len(load_data(path)) == 7
    (copy,) = (cache / "fastdpo_decompressed").rglob("pairs.jsonl")
    made = copy.stat().st_mtime_ns
    assert len(load_data(path)) == 7
    assert copy.stat().st_mtime_ns == made  # (read again, not decompressed again)
    path.write_bytes(gzip.compress((JSONL + JSONL).encode()))
    os.utime(path, ns=(made + 10**9, made + 10**9))  # (a new version: its size and time differ)
    assert len(load_data(path)) == 14


def test_a_folder_of_compressed_splits_and_a_mixture_of_such_files(tmp_path):
    folder = tmp_path / "hh"
    folder.mkdir()
    write(folder, "train.jsonl.gz", JSONL)
    write(folder, "test.jsonl.gz", JSONL[: JSONL.index("\n") + 1])
    splits = load_data(folder, split=None)
    assert {name: len(split) for name, split in splits.items()} == {"train": 7, "test": 1}
    write(tmp_path, "more.tsv", TSV)
    mixture = [
        {"path": str(folder), "split": "test"},
        {"path": "csv", "data_files": str(tmp_path / "more.tsv")},  # (datasets' csv builder would split at commas)
    ]
    rows = load_mixture(parts_of(mixture), text=("prompt", "chosen", "rejected"))[0].to_list()
    assert rows == ROWS[:1] + ROWS
    # one set of shards of two kinds (some compressed) is said so (it said "several files: merge them")
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards, "train-00000-of-00002.jsonl", JSONL)
    write(shards, "train-00001-of-00002.jsonl.gz", JSONL)
    said = r"split 'train' has shards of two kinds \(train-00000-of-00002\.jsonl, train-00001-of-00002\.jsonl\.gz\)"
    with pytest.raises(DataError, match=said + " — give a split's shards one suffix"):
        load_data(shards)


def test_an_unknown_compression_is_refused_with_the_suffixes_read(tmp_path):
    path = tmp_path / "pairs.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(DataError, match=r"unknown file type '\.jsonl\.zst' — use \.jsonl.*\.tsv \(each may end in "):
        load_data(path)


def test_a_compressed_json_lines_stream_is_decompressed_as_it_is_read(tmp_path, cache):
    # (it was decompressed whole into the cache first: a 3.7 MB .gz wrote 297 MB before `data check --limit 5`)
    path = write(tmp_path, "pairs.jsonl.gz", JSONL * 3)
    stream = load_stream(path)
    assert next(iter(stream)) == ROWS[0]
    assert not (cache / "fastdpo_decompressed").exists()
    assert len(list(stream)) == 21
    path.write_bytes(gzip.compress(JSONL.encode())[:-12])  # cut short: said where the stream reaches the cut
    with pytest.raises(DataError, match=r"pairs\.jsonl\.gz: cannot decompress it as \.gz \(EOFError"):
        list(load_stream(path))


def test_a_copy_the_cache_cannot_take_is_the_caches_problem_not_the_files(tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file where the cache's folder would be")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "taken" / "cache"))
    path = write(tmp_path, "pairs.jsonl.gz", JSONL)
    with pytest.raises(DataError, match=r"pairs\.jsonl\.gz: cannot write its decompressed copy in .*taken.*"
                                        r"point HF_DATASETS_CACHE to a folder"):  # fmt: skip
        load_data(path)  # (it said: cannot decompress it as .gz ... download the file again)


# datasets' CSV reader leaves a file open where its stream is left before the end (pandas' reader is not closed)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_csv_quoting_a_cell_goes_on_past_is_refused_and_a_tsvs_fields_are_tabs(tmp_path):
    # pandas reads `"Hi," she said` (a writer that quotes nothing) as `Hi, she said`: the quotes gone, unsaid
    for name, sep in (("said.tsv", "\t"), ("said.csv", ",")):
        path = write(tmp_path, name, sep.join(["prompt", "chosen", "rejected"]) + '\nok\ta\tb\n'.replace("\t", sep)
                     + sep.join(['"Hi" she said', "a", "b"]) + "\n")  # fmt: skip
        with pytest.raises(DataError, match=rf"{name}: line 3: a cell that starts with a quote goes on past its"):
            load_data(path)
    quoted = write(tmp_path, "quoted.tsv", 'prompt\tchosen\trejected\n"a\tb ""c"""\td\te\n')
    assert load_data(quoted).to_list() == [{"prompt": 'a\tb "c"', "chosen": "d", "rejected": "e"}]
    ragged = write(tmp_path, "ragged.tsv", "prompt\tchosen\trejected\na\tb\tc\td\ne\tf\tg\n")
    with pytest.raises(DataError, match=r"line 2: 4 fields where the header has 3 — quote a field that holds a tab"):
        load_data(ragged)
    # a first row with a cell more than the header: pandas took every row's first cell as an index and shifted the
    # others under the wrong names (prompt 'b' for 'a', rejected None), without a word
    shifted = write(tmp_path, "shifted.csv", "prompt,chosen,rejected\na,b,c,d\ne,f,g\n")
    with pytest.raises(DataError, match=r"shifted\.csv: line 2: 4 fields where the header has 3 — .*a comma"):
        load_data(shifted)
    names = ("prompt", "chosen", "rejected")
    # a stream checks each record before its row is given (it took the row's first cells, pandas warning of "loss of
    # data"), later ones too, in a compressed file by its decompressed line; its quote as load_data does
    late = write(tmp_path, "late.csv.gz", "prompt,chosen,rejected\n" + "a,b,c\n" * 3 + "d,e,f,g\n")
    for path, line in ((shifted, 2), (late, 5)):
        given = []
        with pytest.raises(DataError, match=rf"{path.name}: line {line}: 4 fields where the header has 3 — .*comma"):
            given.extend(load_stream(path))
        assert given == [dict(zip(names, "abc", strict=True))] * (line - 2)
    with pytest.raises(DataError, match=r"said\.csv: line 3: a cell that starts with a quote goes on past"):
        list(load_stream(tmp_path / "said.csv"))
    # a record over several lines is named by its first; a cell past the csv module's 128 KiB did not end the check;
    # a trailing delimiter's empty cells are no extra cells (spreadsheets write them), dropped without a warning
    long = write(tmp_path, "long.csv", f'prompt,chosen,rejected\n{"x" * 200_000},a,b\n"two\nlines" she said,a,b\n')
    with pytest.raises(DataError, match=r"long\.csv: line 3: a cell that starts with a quote goes on past"):
        load_data(long)
    trailing = write(tmp_path, "trailing.csv", "prompt,chosen,rejected\na,b,c,\nd,e,f,\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for read in (load_data(trailing).to_list(), list(load_stream(trailing))):
            assert read == [dict(zip(names, "abc", strict=True)), dict(zip(names, "def", strict=True))]
    # streams read in turns leave datasets' reader loggers as they were (a level held across the rows given was
    # left at CRITICAL by streams that did not end in the reverse order they began)
    logger = logging.getLogger("datasets.packaged_modules.csv.csv")
    level, first, second = logger.level, iter(load_stream(trailing)), iter(load_stream(trailing))
    next(first), next(second), list(first), list(second)
    assert logger.level == level and not logger.filters


def test_a_name_without_its_compression_suffix_is_pointed_to_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write(tmp_path, "pairs.jsonl.gz", JSONL)
    with pytest.raises(DataError, match=r"pairs\.jsonl: no such file — did you mean pairs\.jsonl\.gz\?"):
        load_data("pairs.jsonl")
    with pytest.raises(DataError, match=r"give the file's whole name: pairs\.jsonl\.gz"):
        load_data("pairs")
    # datasets' reader logged its failure naming the cache's copy, beside fastdpo's error naming the file
    write(tmp_path, "twice.jsonl.gz", '{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}\n')
    with caplog.at_level("INFO"), pytest.raises(DataError, match=r"twice\.jsonl\.gz: line 1"):
        load_data("twice.jsonl.gz")
    assert "fastdpo_decompressed" not in caplog.text
