"""A token the tokenizer has and the model's embedding has not (added, never resized): every trainer names the row
(it was torch's "IndexError: index out of range in self" from deep inside the embedding, TRL's too)."""

from __future__ import annotations

import datasets
import pytest
from test_train_dpo import common_args, tiny_model
from test_train_sft import common_args as sft_args
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data.vocabulary import check_token_ids
from fastdpo.errors import DataError
from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

trl = pytest.importorskip("trl")
dropin = pytest.importorskip("fastdpo.trl")


def test_a_token_past_the_embedding_is_named_by_every_trainer(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")  # (its vocabulary: the tokenizer's before the new token)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    rows = {"prompt": ["Name a color.", "Say <tool> twice."], "chosen": [" Blue.", " Red."],
            "rejected": [" Green.", " No."]}  # fmt: skip
    pairs = datasets.Dataset.from_dict(rows)
    texts = datasets.Dataset.from_dict({"prompt": rows["prompt"], "completion": rows["chosen"]})
    rows_vocab = load().get_input_embeddings().num_embeddings
    said = rf"row 1, column '(input_ids|prompt_ids)': token id {rows_vocab} in the train data: the model's input "
    said += rf"embedding has {rows_vocab} rows .* model\.resize_token_embeddings\(len\(tokenizer\)\)"
    for trainer_cls, args, data in (
        (DPOTrainer, DPOConfig(**common_args(tmp_path, "dpo")), pairs),
        (dropin.DPOTrainer, trl.DPOConfig(**common_args(tmp_path, "trl_dpo")), pairs),
        (SFTTrainer, SFTConfig(**sft_args(tmp_path, "sft")), texts),
        (dropin.SFTTrainer, trl.SFTConfig(**sft_args(tmp_path, "trl_sft")), texts),
    ):
        with pytest.raises(DataError, match=said):
            trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    model = load()
    model.resize_token_embeddings(len(tokenizer))  # the fix the error gives
    DPOTrainer(model=model, args=DPOConfig(**common_args(tmp_path, "fixed")), train_dataset=pairs,
               processing_class=tokenizer)  # fmt: skip


def test_ids_are_checked_batch_by_batch_and_negative_ids_too():
    class Model:
        def get_input_embeddings(self):
            import torch

            return torch.nn.Embedding(10, 2)

    rows = [[1, 2], [], [3]] * 3000 + [[4, -1]]  # (a bad id in the third batch of 4096)
    data = datasets.Dataset.from_dict({"input_ids": rows})
    with pytest.raises(DataError, match=r"row 9000, column 'input_ids': token id -1 in the eval data"):
        check_token_ids(data, Model(), "eval")
    check_token_ids(data.select(range(9000)), Model(), "eval")  # all within 0..9
    check_token_ids({"a": data.select(range(5))}, Model(), "eval")
    # another tokenization's columns that nothing reads (TRL's ORPO/CPO names) are not checked unless asked for
    stale = datasets.Dataset.from_dict({"prompt_ids": [[1]], "chosen_input_ids": [[128000]]})
    check_token_ids(stale, Model(), "train")
    with pytest.raises(DataError, match="column 'chosen_input_ids': token id 128000"):
        check_token_ids(stale, Model(), "train", columns=("chosen_input_ids",))


def test_the_row_is_the_inputs_past_the_rows_tokenization_dropped(tmp_path):
    # a row dropped before (its prompt fills max_length) shifted the number: "row 3" for the input's row 4
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    prompts = ["Q0?", " ".join(["word"] * 80), "Q2?", "Q3?", "Say <tool>."]  # row 1: over max_length 64
    pairs = datasets.Dataset.from_dict({"prompt": prompts, "chosen": [" A."] * 5, "rejected": [" B."] * 5})
    with pytest.raises(DataError, match=r"^row 4, column 'prompt_ids': token id"):
        DPOTrainer(model=load(), args=DPOConfig(**common_args(tmp_path, "dpo")), train_dataset=pairs,
                   processing_class=tokenizer)  # fmt: skip


def test_the_row_is_the_inputs_when_the_rows_were_shuffled(tmp_path):
    # SFT shuffles its rows (shuffle_dataset): the error named the shuffled position ("row 0" for the input's 4)
    from test_train_sft import prompt_completion_rows

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    rows = prompt_completion_rows(8).to_list()
    rows[4]["prompt"] = "Say <tool>."
    args = SFTConfig(**sft_args(tmp_path, "sft", shuffle_dataset=True, packing=False))
    with pytest.raises(DataError, match=r"^row 4, column 'input_ids': token id"):
        SFTTrainer(model=load(), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


def test_the_row_is_the_inputs_when_the_user_selected_tokenized_rows(tmp_path):
    # tokenized pairs are kept as given: a selection or shuffle of the user's own named its source table's row
    # ("row 7" for the row 2 the user passed)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    vocabulary = load().get_input_embeddings().num_embeddings
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10]} for _ in range(10)]
    rows[7]["chosen_ids"] = [7, vocabulary]
    table = datasets.Dataset.from_list(rows)
    for given in (table.select([9, 8, 7, 6, 5]), table.shuffle(seed=0)):
        row = next(i for i, pair in enumerate(given) if vocabulary in pair["chosen_ids"])
        assert row != 7
        with pytest.raises(DataError, match=rf"^row {row}, column 'chosen_ids': token id {vocabulary}"):
            DPOTrainer(model=load(), args=DPOConfig(**common_args(tmp_path, "dpo")), train_dataset=given,
                       processing_class=tokenizer)  # fmt: skip
    # TRL's trainer tokenizes text pairs only (its KeyError: 'chosen' from inside a map): the drop-in says so
    with pytest.raises(DataError, match="column 'chosen': the train data has no 'chosen' column .*fastdpo.DPOTrainer"):
        dropin.DPOTrainer(model=load(), args=trl.DPOConfig(**common_args(tmp_path, "dropin")), train_dataset=table,
                          processing_class=tokenizer)  # fmt: skip
    texts = datasets.Dataset.from_dict({"prompt": ["Hi?"], "Chosen": [" Hello."], "rejected": [" Go."]})
    args = trl.DPOConfig(**common_args(tmp_path, "eval"))
    pairs = texts.rename_column("Chosen", "chosen")
    trainer = dropin.DPOTrainer(model=load(), args=args, train_dataset=pairs, processing_class=tokenizer)
    said = r"column 'chosen': the eval_held data has no 'chosen' .*rename_column\('Chosen'"
    with pytest.raises(DataError, match=said):
        trainer.evaluate({"held": texts})


def test_a_set_given_to_evaluate_and_the_precompute_are_checked_too(tmp_path):
    # evaluate(new set) (every trainer) and the drop-in's reference precompute (run inside TRL's constructor, before
    # the sets were checked) reached torch's embedding with the id: "IndexError: index out of range in self"
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    good = {"prompt": ["Name a color.", "Name a fruit."], "chosen": [" Blue.", " Pear."], "rejected": [" No.", " Hm."]}
    pairs = datasets.Dataset.from_dict(good)
    texts = datasets.Dataset.from_dict({"prompt": good["prompt"], "completion": good["chosen"]})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    bad_pairs = datasets.Dataset.from_dict({**good, "prompt": ["Say <tool>.", "Name a fruit."]})
    bad_texts = datasets.Dataset.from_dict({"prompt": ["Say <tool>.", "Hi."], "completion": [" Ok.", " Hi."]})
    said = r"^row 0, column '(input_ids|prompt_ids)': token id \d+ in the eval data"
    for trainer_cls, args, data, bad in (
        (DPOTrainer, DPOConfig(**common_args(tmp_path, "dpo")), pairs, bad_pairs),
        (dropin.DPOTrainer, trl.DPOConfig(**common_args(tmp_path, "trl_dpo")), pairs, bad_pairs),
        (SFTTrainer, SFTConfig(**sft_args(tmp_path, "sft")), texts, bad_texts),
        (dropin.SFTTrainer, trl.SFTConfig(**sft_args(tmp_path, "trl_sft")), texts, bad_texts),
    ):
        trainer = trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
        with pytest.raises(DataError, match=said):
            trainer.evaluate(bad)
        with pytest.raises(DataError, match=said.replace("the eval data", "the eval_held data")):  # (a dict's set)
            trainer.evaluate({"held": bad})
    args = trl.DPOConfig(**common_args(tmp_path, "precompute"), precompute_ref_log_probs=True)
    with pytest.raises(DataError, match=r"^row 0, column 'prompt_ids': token id \d+ in the eval data"):
        dropin.DPOTrainer(model=load(), ref_model=load(), args=args, train_dataset=pairs, eval_dataset=bad_pairs,
                          processing_class=tokenizer)  # fmt: skip


def test_a_sequence_past_a_learned_position_table_is_named_by_every_trainer(tmp_path):
    # GPT-2's 32 learned positions and max_length 64: "IndexError: index out of range in self" inside the position
    # embedding at the step that met a long row (TRL's too; a device-side assert on a GPU)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    load = lambda: GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")  # noqa: E731
    words = " ".join(["word"] * 40)
    rows = {"prompt": ["Name a color.", "Q?", "Say it."], "chosen": [" Blue.", " " + words, " Ok."],
            "rejected": [" Green.", " " + words + " no", " No."]}  # fmt: skip
    pairs = datasets.Dataset.from_dict(rows)
    texts = datasets.Dataset.from_dict({"prompt": rows["prompt"], "completion": rows["chosen"]})
    said = r"^row 1, column '(input_ids|prompt_ids)': a sequence of \d+ tokens in the train data: GPT2LMHeadModel has "
    said += r"a learned position table of 32 positions .* set max_length to at most 32"
    for trainer_cls, args, data in (
        (DPOTrainer, DPOConfig(**common_args(tmp_path, "dpo")), pairs),
        (dropin.DPOTrainer, trl.DPOConfig(**common_args(tmp_path, "trl_dpo")), pairs),
        (SFTTrainer, SFTConfig(**{**sft_args(tmp_path, "sft"), "max_length": 64, "packing": False}), texts),
        (dropin.SFTTrainer, trl.SFTConfig(**{**sft_args(tmp_path, "trl_sft"), "max_length": 64}), texts),
    ):
        with pytest.raises(DataError, match=said):
            trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    # a dict's eval set keyed "train", under the drop-in's precompute (which checks it first): named as the eval set
    args = trl.DPOConfig(**common_args(tmp_path, "trl_dpo"), precompute_ref_log_probs=True)
    with pytest.raises(DataError, match=said.replace("the train data", "the eval_train data")):
        dropin.DPOTrainer(model=load(), args=args, train_dataset=pairs.select([0, 2]), eval_dataset={"train": pairs},
                          processing_class=tokenizer)  # fmt: skip
    # cut to the table (max_length 32): trains, also where a row of 32-token sequences pads a short one's row
    # (packing=False: one pair per row, 64 tokens; its padding was one segment of positions 0..55, past the table)
    for options in ({}, {"packing": False, "per_device_train_batch_size": 3}, {"pack_length": 64}):
        args = DPOConfig(**{**common_args(tmp_path, "fits"), "max_length": 32, "max_steps": 1, **options})
        DPOTrainer(model=load(), args=args, train_dataset=pairs, processing_class=tokenizer).train()
    args = SFTConfig(**{**sft_args(tmp_path, "sft_fits"), "max_length": 32, "packing": False, "max_steps": 1,
                        "pad_to_multiple_of": 24, "per_device_train_batch_size": 3})  # fmt: skip
    SFTTrainer(model=load(), args=args, train_dataset=texts, processing_class=tokenizer).train()


def test_a_sequence_longer_than_the_rows_is_named_when_the_trainer_is_built(tmp_path):
    # pack_length without max_length (sequences of any length), or packing=False (a pair's two sequences in one
    # row): the collator refused the long one at the step that met it, naming its place in the batch ("row 1")
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = [{"prompt": f"Q{i}?", "chosen": " Yes.", "rejected": " No."} for i in range(8)]
    rows[6]["chosen"] = " " + " ".join(["word"] * 60)
    pairs = datasets.Dataset.from_list(rows)
    said = r"^row 6, column 'prompt_ids': the "
    cases = (({"max_length": None, "pack_length": 32}, said + r"sequence is \d+ tokens", "; or set max_length"),
             ({"max_length": 40, "pack_length": 40, "packing": False},
              said + r"pair \(chosen \+ rejected: packing=False\) is \d+ tokens",
              ": a pair's row holds both sequences, up to 2 × max_length; or lower max_length (now 40)"))  # fmt: skip
    for options, expected, fix in cases:  # (the fix said "or set max_length" where it was set)
        args = DPOConfig(**{**common_args(tmp_path, "dpo"), **options})
        with pytest.raises(DataError, match=expected + r" in the train data but pack_length is \d+") as error:
            DPOTrainer(model=load(), args=args, train_dataset=pairs, processing_class=tokenizer)
        assert error.value.fix == f"raise pack_length (or leave it unset){fix}"
    rows[6]["chosen"] = " Maybe."
    args = DPOConfig(**{**common_args(tmp_path, "fits"), "max_length": None, "pack_length": 32, "max_steps": 1})
    DPOTrainer(model=load(), args=args, train_dataset=datasets.Dataset.from_list(rows),
               processing_class=tokenizer).train()  # fmt: skip


def test_sequences_kept_as_given_are_checked_against_the_position_table_uncut(tmp_path):
    # dataset_kwargs={"skip_prepare_dataset": True} trains the rows as given, not cut to max_length: the check took
    # them as cut, passed, and the step failed inside the embedding ("IndexError: index out of range in self")
    import torch
    import trl
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = GPT2LMHeadModel(config)
    rows = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], list(range(5, 45))]})  # 40 tokens in row 1
    for trainer_cls, config_cls in ((SFTTrainer, SFTConfig), (dropin.SFTTrainer, trl.SFTConfig)):
        args = config_cls(**{**sft_args(tmp_path, "sft"), "max_length": 32, "packing": False,
                             "dataset_kwargs": {"skip_prepare_dataset": True}})  # fmt: skip
        said = "a sequence of 40 tokens in the {} data: .* cut the sequences to at most 32 tokens"
        with pytest.raises(DataError, match=r"^row 1, column 'input_ids': " + said.format("train")):
            trainer_cls(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        # a set given to evaluate() (TRL's takes it as given there too) and each of a dict's
        trainer = trainer_cls(model=model, args=args, train_dataset=rows.select([0]), processing_class=tokenizer)
        with pytest.raises(DataError, match=r"^row 1, column 'input_ids': " + said.format("eval")):
            trainer.evaluate(rows)
        with pytest.raises(DataError, match=r"^row 1, column 'input_ids': " + said.format("eval_test")):
            trainer.evaluate({"test": rows})


def test_a_packed_rows_sequence_past_the_position_table_is_named_as_a_packed_row():
    # a packed dataset's rows are its packed rows (not the input's): said, as the token-id check says it
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastdpo.data.vocabulary import check_positions

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    packed = datasets.Dataset.from_dict({"input_ids": [list(range(10)), list(range(30))],
                                         "seq_lengths": [[4, 6], [10, 20]]})  # fmt: skip
    with pytest.raises(DataError, match=r"^row 1, column 'seq_lengths': a sequence of 20 tokens in the train data "
                                        r"\(a packed row\)"):  # fmt: skip
        check_positions(packed, model, "train", None)


def test_tokenized_labels_are_checked_when_the_trainer_is_built(tmp_path):
    # labels past the head, -1 used as the ignore index, or fewer labels than input_ids were found mid-training, when
    # a step reached the row (after 3 optimizer steps here: the head's error naming no row, or a batch's row 0)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    head = load().get_output_embeddings().weight.shape[0]
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]} for _ in range(8)]
    cases = (("past", [-100, -100, 7, head], rf"row 5, column 'labels': label {head} in the train data: the model's "
                                             rf"head has {head} rows"),
             ("minus_one", [-1, -1, 7, 8], "row 5, column 'labels': label -1 in the train data"),
             ("short", [7, 8], "row 5, column 'labels': the train data has 2 labels for 4 input_ids"))  # fmt: skip
    for name, labels, said in cases:
        bad = [dict(row) for row in rows]
        bad[5]["labels"] = labels
        data = datasets.Dataset.from_list(bad)
        for trainer_cls, config in ((SFTTrainer, SFTConfig), (dropin.SFTTrainer, trl.SFTConfig)):
            args = config(**sft_args(tmp_path, f"{name}_{trainer_cls.__module__}"), packing=False)
            with pytest.raises(DataError, match=said):
                trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    SFTTrainer(model=load(), args=SFTConfig(**sft_args(tmp_path, "fine"), packing=False),
               train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
