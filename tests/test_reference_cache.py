"""The cached reference: values equal a naive computation, reuse runs no reference forward, bad files are rebuilt."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_train_dpo import common_args, synthetic_pairs, tiny_model
from test_train_step import make_pairs, naive_sums, tiny_llama
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError
from fastdpo.model.reference_cache import cached_reference_logps, compute_reference_logps
from fastdpo.train import DPOConfig, DPOTrainer


class ForwardCounter:
    """Counts forward passes of a model's body (on batches: the once-per-model probe of fastdpo.model.probe is run
    before counting)."""

    def __init__(self, model):
        from fastdpo.model.probe import check_head

        check_head(model)
        self.calls = 0
        model.get_decoder().register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1


def test_values_equal_a_naive_padded_computation():
    model = tiny_llama(1)  # fp64
    rows = make_pairs(seed=11, count=7)
    got = compute_reference_logps(model, rows, max_length=None, batch_size=3, progress=False)
    expected, _, _ = naive_sums(model, rows)
    # stored in fp32: a few fp32 ulps of |logps|
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-5)


class Shares:
    """Rank ``rank`` of ``world`` processes, as ``_shared_pass`` uses an Accelerator: its ``gather`` gives
    ``shares`` (each rank's tensor, taken from an earlier pass as that rank) where given, else stops the pass
    with the tensor this rank would send."""

    def __init__(self, world: int, rank: int, shares: list | None = None):
        self.num_processes, self.process_index, self.shares, self.device = world, rank, shares, "cpu"

    def gather(self, tensor):
        if self.shares is None:
            raise Sent(tensor)
        return torch.cat(self.shares)


class Sent(Exception):
    pass


@pytest.mark.parametrize(("count", "world"), [(7, 2), (5, 4), (2, 3)])
def test_processes_sharing_the_pass_gather_every_row_in_order(count, world):
    # each process computes one share (the last padded, a share past the rows all padding: as many batches each)
    from fastdpo.model.reference_cache import _shared_pass

    model = tiny_llama(5)  # fp64
    rows = make_pairs(seed=15, count=count)
    options = {"max_length": None, "batch_size": 2, "progress": False}
    sent = []
    for rank in range(world):
        with pytest.raises(Sent) as caught:
            _shared_pass(Shares(world, rank), model, rows, **options)
        sent.append(caught.value.args[0])
    assert {len(share) for share in sent} == {-(-count // world)}  # (every process ran as many rows)
    got = _shared_pass(Shares(world, 0, sent), model, rows, **options)
    expected, _, _ = naive_sums(model, rows)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-5)  # stored in fp32, as above


def test_ld_alpha_values_equal_a_naive_padded_computation_and_have_their_own_file(tmp_path):
    from fastdpo.data import pack_pairs
    from fastdpo.train.step import reference_logps

    model = tiny_llama(4)  # fp64
    rows = make_pairs(seed=14, count=7)
    expected, _, _ = naive_sums(model, rows, ld_alpha=0.25)
    assert not torch.allclose(expected, naive_sums(model, rows)[0])  # some pair has a tail
    got = compute_reference_logps(model, rows, max_length=None, batch_size=3, progress=False, ld_alpha=0.25)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-5)  # stored in fp32, as above
    batch = pack_pairs(rows, pack_length=None)  # the separate reference's pass on a training batch (pairs reordered)
    torch.testing.assert_close(reference_logps(model, batch, ld_alpha=0.25), expected[batch.pair_ids],
                               rtol=1e-10, atol=1e-10)  # fp64 sums in another order  # fmt: skip
    common = {"cache_dir": tmp_path, "max_length": None, "progress": False}
    plain = cached_reference_logps(model.float(), rows, **common)
    weighted = cached_reference_logps(model, rows, **common, ld_alpha=0.25)
    assert len(list(tmp_path.glob("*.arrow"))) == 2 and not torch.equal(plain, weighted)
    counter = ForwardCounter(model)
    assert torch.equal(cached_reference_logps(model, rows, **common, ld_alpha=0.25), weighted)
    assert counter.calls == 0


def test_second_call_reads_the_file_and_any_key_change_recomputes(tmp_path):
    model = tiny_llama(2).float()
    rows = make_pairs(seed=12, count=6)
    counter = ForwardCounter(model)
    common = {"cache_dir": tmp_path, "max_length": None, "batch_size": 4, "progress": False}
    first = cached_reference_logps(model, rows, **common)
    computed = counter.calls
    assert computed == 2  # 6 rows in batches of 4
    again = cached_reference_logps(model, rows, **common)
    assert counter.calls == computed  # zero reference forwards
    assert torch.equal(first, again)
    cached_reference_logps(model, rows, **{**common, "max_length": 9})  # truncation changed: recomputed
    assert counter.calls == computed + 2
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # weights changed: recomputed
    cached_reference_logps(model, rows, **common)
    assert counter.calls == computed + 4
    assert len(list(tmp_path.glob("*.arrow"))) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip_value", "garbage"])
def test_a_corrupt_file_is_detected_and_rebuilt(damage, tmp_path):
    model = tiny_llama(3).float()
    rows = make_pairs(seed=13, count=5)
    common = {"cache_dir": tmp_path, "max_length": None, "progress": False}
    good = cached_reference_logps(model, rows, **common)
    (path,) = tmp_path.glob("*.arrow")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_value":  # a value changed in place: the file still parses, the checksum catches it
        needle = good[2, 0].numpy().tobytes()
        at = bytes(data).find(needle)
        assert at >= 0
        data[at : at + 4] = torch.tensor(float(good[2, 0]) + 1.0).numpy().astype("float32").tobytes()
    else:
        data = bytearray(b"not an arrow file at all")
    path.write_bytes(bytes(data))
    counter = ForwardCounter(model)
    with pytest.warns(UserWarning, match="not usable"):
        rebuilt = cached_reference_logps(model, rows, **common)
    assert counter.calls > 0 and torch.equal(rebuilt, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is valid: read without a warning
        assert torch.equal(cached_reference_logps(model, rows, **common), good)


def test_trainer_with_cached_reference_trains_as_with_a_separate_one_and_reuses_it(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    cache = {"ref_cache_dir": str(tmp_path / "cache")}

    def train(name, **extra):
        trainer = DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, name), **extra), train_dataset=data,
                             eval_dataset=synthetic_pairs(3, seed=5), processing_class=tokenizer)  # fmt: skip
        trainer.train()
        return trainer, [log for log in trainer.state.log_history if "loss" in log]

    separate, separate_logs = train("separate")
    cached, cached_logs = train("cached", precompute_ref_log_probs=True, **cache)
    _, separate_ld = train("separate_ld", ld_alpha=0.5)  # LD-DPO: the cache holds weighted sums
    _, cached_ld = train("cached_ld", precompute_ref_log_probs=True, ld_alpha=0.5, **cache)
    assert separate.ref_model is not None and cached.ref_model is None  # no second copy of the weights
    for step in (0, 1):  # the cache was computed in other batches: fp32 rounding of the reference sums
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert cached_logs[step][name] == pytest.approx(separate_logs[step][name], rel=1e-5, abs=1e-7), name
            assert cached_ld[step][name] == pytest.approx(separate_ld[step][name], rel=1e-5, abs=1e-7), name
    # some sequence has a tail past its pair's shorter side: LD-DPO's sums differ
    names = ("logps/chosen", "logps/rejected")
    assert any(cached_ld[s][n] != pytest.approx(cached_logs[s][n], rel=1e-3) for s in (0, 1) for n in names)
    assert cached.evaluate()["eval_loss"] == pytest.approx(separate.evaluate()["eval_loss"], rel=1e-5)

    policy = load()
    counter = ForwardCounter(policy)
    args = DPOConfig(**{**common_args(tmp_path, "beta"), "beta": 0.5}, reference="cached", **cache)
    held_out = synthetic_pairs(3, seed=5)
    DPOTrainer(policy, args=args, train_dataset=data, eval_dataset=held_out, processing_class=tokenizer)
    assert counter.calls == 0  # another beta: the reference log-probs come from the files


def test_the_cache_is_computed_under_the_trainers_autocast_and_keyed_by_it(tmp_path):
    # the policy's and a separate reference's passes run under bf16/fp16 autocast: the cached values must too, or
    # step 1's rewards are off zero where the policy still equals its reference
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(6)
    cache = tmp_path / "cache"

    def cached_values(bf16: bool):
        args = DPOConfig(**{**common_args(tmp_path, f"bf16_{bf16}"), "bf16": bf16}, use_cpu=True, reference="cached",
                         ref_cache_dir=str(cache), precompute_ref_batch_size=4)  # fmt: skip
        trainer = DPOTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer)
        columns = trainer.train_dataset.select_columns(["ref_chosen_logps", "ref_rejected_logps"])
        return torch.tensor(list(zip(*columns.to_dict().values(), strict=True))), trainer.train_dataset

    full, tokenized = cached_values(False)
    half, _ = cached_values(True)
    assert len(list(cache.glob("*.arrow"))) == 2  # two keys: neither read for the other
    rows = tokenized.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = compute_reference_logps(load(), rows, max_length=64, batch_size=4, progress=False)
    assert torch.equal(half, expected)  # the same computation, in the same batches
    assert not torch.equal(half, full)


def test_reference_options_that_contradict_are_refused(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    for options, column in (({"precompute_ref_log_probs": True, "reference": "separate"}, "reference"),
                            ({"reference": "none"}, "reference"), ({"reference": "adapter"}, "reference")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"option '{column}'"):
            args = DPOConfig(**common_args(tmp_path, "x"), **options)
            DPOTrainer(load(), args=args, train_dataset=synthetic_pairs(2), processing_class=tokenizer)


def test_the_key_is_what_the_values_depend_on_not_a_label(tmp_path, monkeypatch):
    # (a) computed under bf16 autocast without autocast= (the API, or DeepSpeed's label without its autocast): the
    # values were keyed as fp32 and a fp32 run read them (1e-3 off); (b) LoRA's alpha scales the same weights
    # (a run with another alpha read the first's file); (c) an unwritable folder failed after the whole pass
    from peft import LoraConfig, get_peft_model

    from fastdpo.model.reference_cache import default_cache_dir

    model = tiny_llama(4).float()
    rows = make_pairs(seed=3, count=5)
    common = {"cache_dir": tmp_path / "cache", "max_length": None, "progress": False}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = cached_reference_logps(model, rows, **common)
    full = cached_reference_logps(model, rows, **common)
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 2 and not torch.equal(half, full)
    torch.testing.assert_close(full, compute_reference_logps(model, rows, max_length=None, progress=False),
                               rtol=0, atol=0)  # fmt: skip
    adapted = []
    for alpha in (8, 32):
        torch.manual_seed(0)
        lora = get_peft_model(tiny_llama(4).float(), LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj"]))
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5)  # (the same weights in both: seeded)
        adapted.append(cached_reference_logps(lora, rows, **common))
    assert not torch.equal(*adapted)  # a file of its own each
    import fastdpo.model.reference_cache as cache_module

    def unwritable(path, key, values):  # (as a folder the user cannot write: root writes into a chmod'ed one)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module, "write_cache", unwritable)
    said = "reference log-probs not cached: .*locked .*Permission denied.* ref_cache_dir"
    with pytest.warns(UserWarning, match=said):
        values = cached_reference_logps(model, rows, **{**common, "cache_dir": tmp_path / "locked"})
    assert torch.equal(values, full)
    monkeypatch.delenv("FASTDPO_CACHE", raising=False)
    for xdg in ("", "relative/cache"):  # the XDG spec: unset (it wrote into the current folder)
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert default_cache_dir().is_absolute()


def test_the_cache_is_computed_on_the_steps_attention_and_keyed_by_it(tmp_path):
    # packed_attention="varlen": the cache was computed on the model's own (sdpa) attention, whose rounding differs,
    # and a file computed so was read by a varlen run (the key lacked it): step 1 of a policy still equal to its
    # reference had rewards/accuracies 0.125 and margins 3.6e-7 where they are exactly 0
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    cache = tmp_path / "cache"
    logs = {}
    for attention in ("model", "varlen"):  # (the model's own first: its file must not be the one varlen reads)
        args = DPOConfig(**{**common_args(tmp_path, attention), "max_steps": 1, "per_device_train_batch_size": 8},
                         packed_attention=attention, reference="cached", ref_cache_dir=str(cache))  # fmt: skip
        trainer = DPOTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        logs[attention] = trainer.state.log_history[0]
    assert len(list(cache.glob("*.arrow"))) == 2  # two keys
    for attention, log in logs.items():
        assert log["rewards/margins"] == 0 and log["rewards/accuracies"] == 0, (attention, log)


def test_the_key_holds_the_attention_and_the_device_and_not_where_the_model_was_loaded_from(tmp_path, monkeypatch):
    # eager and sdpa round apart: an sdpa file read by an eager run gave margins of -2.4e-7 at step 1; the same weights
    # saved at another path were computed again (the config's _name_or_path); a learned scalar (a 0-dim parameter)
    # failed in the fingerprint; a folder above the cache that cannot be entered stopped the run
    model = tiny_llama(2).float()
    rows = make_pairs(seed=12, count=4)
    counter = ForwardCounter(model)
    common = {"cache_dir": tmp_path, "max_length": None, "batch_size": 4, "progress": False}
    cached_reference_logps(model, rows, **common)
    model.config._name_or_path = "somewhere/else"
    cached_reference_logps(model, rows, **common)
    assert counter.calls == 1
    model.config._attn_implementation = "eager" if model.config._attn_implementation != "eager" else "sdpa"
    cached_reference_logps(model, rows, **common)
    assert counter.calls == 2 and len(list(tmp_path.glob("*.arrow"))) == 2
    from fastdpo.model.reference_cache import config_fingerprint

    class Engine(torch.nn.Module):  # (DeepSpeed's engine: the model as .module, its own config a dict)
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"train_batch_size": 8}

    assert config_fingerprint(Engine(model)) == config_fingerprint(model)  # (it failed on the dict's to_json_string)
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.0)))
    cached_reference_logps(model, rows, **common)
    assert counter.calls == 3
    from pathlib import Path

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", refused)  # (as a folder above it that cannot be entered makes it fail)
    values = cached_reference_logps(model, rows, **{**common, "cache_dir": tmp_path / "locked" / "inner"})
    assert counter.calls == 4 and torch.isfinite(values).all()  # computed (its write warned about, where it fails)


def test_reference_log_probs_that_overflow_name_the_option_and_the_way_on(tmp_path, monkeypatch):
    import fastdpo.model.reference_cache as cache

    model = tiny_llama(2).float()
    rows = make_pairs(seed=12, count=4)

    def overflowing(*args, **kwargs):
        return torch.tensor([[0.0, 0.0], [float("-inf"), 0.0], [0.0, 0.0], [0.0, float("nan")]])

    monkeypatch.setattr(cache, "compute_reference_logps", overflowing)
    with pytest.raises(ConfigError, match=r"option 'reference': reference log-probs are not finite at rows \[1, 3\] "
                       "of the 4 prepared rows.*compute the reference in fp32"):  # fmt: skip
        cached_reference_logps(model, rows, cache_dir=tmp_path, max_length=None, progress=False)


def test_a_killed_writes_temporary_file_is_removed_once_a_day_old(tmp_path):
    # a write killed by SIGKILL leaves its temporary file (never read: only a renamed file is); it stayed for good
    import os
    import time

    model = tiny_llama(2).float()
    old, fresh = tmp_path / ".abc.arrow.x1.tmp", tmp_path / ".def.arrow.x2.tmp"
    for leftover in (old, fresh):
        leftover.write_bytes(b"half a file")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    cached_reference_logps(model, make_pairs(seed=12, count=2), cache_dir=tmp_path, max_length=None, progress=False)
    assert not old.exists() and fresh.exists()  # (a fresh one may be another run's write under way)
