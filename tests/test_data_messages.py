"""What a data error says: the roles taken where a message's role is unknown, the data's own columns where one is
missing, no rows where there are none (each message was wrong or unhelpful before)."""

from __future__ import annotations

import pytest


def test_an_unknown_role_is_named_with_the_roles_taken():
    # the error named "a role of quality.ROLES" without saying which roles those are, nor how to map others
    import datasets
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.data import prepare_preferences, tokenize_preferences
    from fastdpo.errors import DataError

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "model", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]  # fmt: skip
    with pytest.raises(DataError) as error:
        tokenize_preferences(
            prepare_preferences(datasets.Dataset.from_list(rows)), build_tiny_tokenizer(), max_length=64
        )
    assert error.value.row == 0 and error.value.column == "chosen"
    assert "role 'model'" in str(error.value) and "roles system, developer, user, assistant," in str(error.value)
    assert "'model' to 'assistant'" in error.value.fix


def test_missing_column_errors_do_not_list_the_commands_row_numbers():
    # the CLI numbers a file's rows in a column of its own, which the "columns present" of the error listed
    from fastdpo.data import pairs, schema

    present = ["question", "answer", "__fastdpo_file_row__", "__fastdpo_row__"]
    for error in (schema.missing_column("chosen", present), pairs.missing_column("prompt", "prompt", present)):
        assert "(columns present: question, answer)" in error.fix


def test_an_empty_dataset_is_said_to_have_no_rows():
    # Dataset.from_list([]) has no columns either: the error named a missing 'chosen' column ("columns present: ")
    import datasets

    from fastdpo.data import prepare_preferences
    from fastdpo.errors import DataError

    with pytest.raises(DataError, match="the dataset has no rows"):
        prepare_preferences(datasets.Dataset.from_list([]))
