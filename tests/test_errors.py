from __future__ import annotations

import os
import pickle

import pytest

from fastdpo.atomic import atomic_open, atomic_write
from fastdpo.errors import ConfigError, DataError, unknown_choice


def test_data_error_names_row_column_and_fix():
    err = DataError("is empty", row=17, column="chosen", fix="drop the row or run 'fastdpo data filter'")
    assert isinstance(err, ValueError)
    assert str(err) == "row 17, column 'chosen': is empty — drop the row or run 'fastdpo data filter'"
    assert (err.row, err.column) == (17, "chosen")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is DataError and str(again) == str(err) and again.fix == err.fix


def test_config_error_suggests_the_close_match():
    err = unknown_choice("loss_type", "simp0", ["sigmoid", "simpo", "ipo"])
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert str(err) == "option 'loss_type': unknown value 'simp0' — did you mean 'simpo'?"
    far = unknown_choice("loss_type", "zzz", ["sigmoid", "ipo"])
    assert "use one of 'sigmoid', 'ipo'" in str(far)


def test_a_data_problem_under_a_setting_names_the_option_through_copies_and_processes(tmp_path):
    # "column 'data_filter'" beside ConfigErrors' "option 'eval_strategy'" read as a data column
    err = DataError("every one of the 2 training rows is dropped", option="data_filter", fix="check the data")
    assert str(err) == "option 'data_filter': every one of the 2 training rows is dropped — check the data"
    assert err.column == "data_filter"  # (code reading the place still finds it there)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is DataError and str(again) == str(err)
    moved = err.but(message="datasets[0]: no rows", column="datasets[0].split")  # (a mixture's re-raise)
    assert str(moved) == "option 'datasets[0].split': datasets[0]: no rows — check the data"
    assert str(DataError("is empty", row=3, column="chosen").but(row=7)) == "row 7, column 'chosen': is empty"
    assert str(ConfigError("too big", column="beta").but(fix="lower it")) == "option 'beta': too big — lower it"
    # a local file's missing split, from the mixture that read it
    from fastdpo.data.load import load_data
    from fastdpo.data.mixture import load_mixture, parts_of

    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(DataError, match=r"^option 'split': .*a\.jsonl is one file"):
        load_data(tmp_path / "a.jsonl", split="test")
    with pytest.raises(DataError, match=r"^option 'datasets\[0\]\.split': datasets\[0\] .*is one file"):
        load_mixture(parts_of([{"path": str(tmp_path / "a.jsonl"), "split": "test"}]))


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, '{"a": 1}')
    atomic_write(target, b"binary")
    assert target.read_bytes() == b"binary"
    assert os.listdir(target.parent) == ["out.json"]


def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path):
    # mkstemp's temporary file is 0600: reports and configs were unreadable to the group, whatever the umask
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.md", "x")
        shared = tmp_path / "shared.md"
        shared.write_text("old")
        shared.chmod(0o664)
        atomic_write(shared, "new")
    finally:
        os.umask(old)
    assert (tmp_path / "new.md").stat().st_mode & 0o777 == 0o644
    assert shared.stat().st_mode & 0o777 == 0o664  # an existing file keeps its own


def test_atomic_open_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half written")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "original"
    assert os.listdir(tmp_path) == ["keep.txt"]
    with pytest.raises(ValueError, match="^mode:"), atomic_open(target, "a"):
        pass


def test_an_error_raised_again_from_a_dataloader_worker_is_its_own_line():
    # torch re-raises a worker's exception with the worker's traceback as its message: the CLI printed 56 lines
    from torch._utils import ExceptionWrapper

    from fastdpo.errors import DataError

    try:
        raise DataError("is empty", row=5, column="chosen", fix="drop the row")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert str(raised.value) == "row 5, column 'chosen': is empty — drop the row"


def test_an_unreachable_hub_error_says_how_to_skip_the_retries(monkeypatch):
    # offline, huggingface_hub retried a mistyped or uncached hub name for 25-50 s before the error, which did not
    # say that HF_HUB_OFFLINE=1 looks in the cache at once
    from fastdpo.errors import offline_hint

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    try:  # (as transformers raises it: its message, the cause a requests error)
        try:
            raise ConnectionError("'[Errno -2] Name or service not known' thrown while requesting HEAD https://x")
        except ConnectionError as cause:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause
    except OSError as error:
        unreachable = error
    assert offline_hint(unreachable).startswith(", or, without network, set HF_HUB_OFFLINE=1 to read the local cache")
    assert offline_hint(unreachable.__cause__) == offline_hint(unreachable)  # (the cause alone says it too)
    assert offline_hint(OSError("some/model does not appear to have a file named config.json")) == ""  # (reached)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (set: nothing was retried)
    assert offline_hint(unreachable) == ""
