"""Message trees (oasst1/oasst2's layout: one message a row, linked by parent_id, replies ranked among siblings) →
preference pairs (``build_tree_pairs``, ``fastdpo data pairs --tree``)."""

from __future__ import annotations

import json

import pytest

from fastdpo.cli import main as cli
from fastdpo.data import build_tree_pairs, check_preferences, prepare_preferences
from fastdpo.errors import DataError


def message(mid, parent, text, role, rank=None, **more) -> dict:
    return {"message_id": mid, "parent_id": parent, "text": text, "role": role, "rank": rank, "lang": "en",
            "deleted": False, **more}  # fmt: skip


TREE = [
    message("q", None, "What is 2+2?", "prompter"),  # 0
    message("a", "q", "4.", "assistant", 0),  # 1: the best reply to q
    message("b", "q", "5.", "assistant", 2),  # 2: the worst
    message("c", "q", "Four.", "assistant", 1),  # 3
    message("q2", "a", "Why?", "prompter", 0),  # 4: a follow-up under the best reply
    message("d", "q2", "Counting.", "assistant", 1),  # 5
    message("e", "q2", "Axioms.", "assistant", 0),  # 6
    message("f", "q2", "Unranked.", "assistant"),  # 7: rank None → bad_scores
    message("r", None, "Hallo?", "prompter", lang="de"),  # 8: a second tree
    message("g", "r", "Hallo!", "assistant", 0, lang="de"),  # 9: a single ranked reply → too_few_completions
    message("h", "gone", "Orphan.", "assistant", 0),  # 10: its parent is in no row → missing_parent
    message("q3", None, "Deleted question", "prompter", deleted=True),  # 11
    message("i", "q3", "Reply to it.", "assistant", 0),  # 12: under a deleted message → deleted
    message("j", "a", "A reply to a reply.", "assistant", 0),  # 13: assistant after assistant → roles_out_of_order
    message("k", "q2", "   ", "assistant", 2),  # 14: blank text → bad_message
    message("a", "q", "Same id.", "assistant", 3),  # 15: the id of row 1 again → duplicate_id
    message("l", "m", "Loop one.", "assistant", 0),  # 16: 16 → 17 → 16: a loop → missing_parent
    message("m", "l", "Loop two.", "prompter", 0),  # 17
]


def test_sibling_replies_pair_best_against_worst_under_their_whole_conversation():
    result = build_tree_pairs(TREE)
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    shown = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_row", "rejected_row", "lang")
    pairs = [{key: pair[key] for key in shown} for pair in result.dataset]
    assert pairs == [
        {"prompt": [user("What is 2+2?")], "chosen": [bot("4.")], "rejected": [bot("5.")], "chosen_score": 0.0,
         "rejected_score": 2.0, "chosen_row": 1, "rejected_row": 2, "lang": "en"},
        {"prompt": [user("What is 2+2?"), bot("4."), user("Why?")], "chosen": [bot("Axioms.")],
         "rejected": [bot("Counting.")], "chosen_score": 0.0, "rejected_score": 1.0, "chosen_row": 6,
         "rejected_row": 5, "lang": "en"},
    ]  # fmt: skip
    assert result.dataset[0]["chosen_message_id"] == "a" and result.dataset[0]["rejected_message_id"] == "b"
    # every assistant message not paired is counted by its row in the tree data, under one reason
    assert {reason: rows for reason, rows in result.dropped_rows.items() if rows} == {
        "missing_parent": [10, 16], "deleted": [12], "roles_out_of_order": [13], "bad_message": [14],
        "duplicate_id": [15], "bad_scores": [7], "too_few_completions": [9]}  # fmt: skip
    assert result.summary().startswith("best_vs_worst: 2 pairs from 18 rows; dropped 8 rows")
    # the pairs are what the trainers read without a word
    prepared = prepare_preferences(result.dataset)
    assert check_preferences(prepared).counts == {}
    every = build_tree_pairs(TREE, strategy="all_above_margin")
    assert [(pair["chosen_row"], pair["rejected_row"]) for pair in every.dataset] == [(1, 2), (1, 3), (3, 2), (6, 5)]


def test_the_command_writes_the_trees_pairs_and_refuses_what_a_tree_does_not_take(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    renamed = [{**{k: v for k, v in row.items() if k not in ("text", "rank")}, "body": row["text"],
                "place": row["rank"]} for row in TREE]  # fmt: skip
    (tmp_path / "tree.jsonl").write_text("".join(json.dumps(row) + "\n" for row in renamed))
    flags = ["--tree", "--completions", "body", "--scores", "place"]
    assert cli(["data", "pairs", "tree.jsonl", "out.jsonl", *flags]) == 0
    assert capsys.readouterr().out.startswith("best_vs_worst: 2 pairs from 18 rows; dropped 8 rows")
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(pair["chosen_row"], pair["rejected_row"]) for pair in written] == [(1, 2), (6, 5)]
    assert written[1]["chosen"] == [{"role": "assistant", "content": "Axioms."}]
    dropped = json.loads((tmp_path / ".out.jsonl.dropped.json").read_text())
    assert dropped["dropped_rows"]["missing_parent"] == [10, 16]
    for flags, said in ((["--prompt", "q"], "option '--prompt': a message tree's prompts are its conversations"),
                        (["--group-by-prompt"], "option '--group-by-prompt'"),
                        ([], "column 'text': column not found")):  # fmt: skip
        assert cli(["data", "pairs", "tree.jsonl", "o.jsonl", "--tree", *flags]) == 2
        assert said in capsys.readouterr().err, flags
    with pytest.raises(DataError, match="no assistant message of the 1 rows has its conversation whole"):
        build_tree_pairs([message("x", "y", "Lost.", "assistant", 0)])


def test_replies_to_two_messages_of_the_same_text_pair_within_their_own_message():
    # grouped by the prompt's text, two trees that open alike were one group: a reply of one against a reply of the
    # other (ranks of two sibling sets compared), the other tree's pair lost without a count
    trees = [message("r1", None, "Hello", "prompter"), message("a1", "r1", "Hi!", "assistant", 0),
             message("b1", "r1", "What?", "assistant", 1), message("r2", None, "Hello", "prompter"),
             message("a2", "r2", "Hey.", "assistant", 1), message("b2", "r2", "Yo.", "assistant", 0)]  # fmt: skip
    result = build_tree_pairs(trees)
    assert [(pair["chosen_row"], pair["rejected_row"]) for pair in result.dataset] == [(1, 2), (5, 4)]
    assert "_parent_row" not in result.dataset[0] and sum(result.dropped.values()) == 0


def test_a_users_columns_ending_like_the_bookkeeping_are_carried_and_its_own_names_refused():
    # the bookkeeping columns were left out by their endings: a user's parent_row, carried per side, went with them
    rows = [{**row, "parent_row": f"note {i}"} for i, row in enumerate(TREE[:4])]
    pair = build_tree_pairs(rows).dataset[0]
    assert (pair["chosen_parent_row"], pair["rejected_parent_row"]) == ("note 1", "note 2")
    assert not {key for key in pair if key.startswith("_") or key.endswith("__tree_row")}
    with pytest.raises(DataError, match="column '_tree_row': the column name '_tree_row' is build_tree_pairs' own"):
        build_tree_pairs([{**row, "_tree_row": 0} for row in TREE[:4]])
