"""Activation offloading and the host-resident reference (``fastdpo.model.offload``).

On a CPU there is nowhere to offload to, so the trainers' runs here offload CPU tensors to fresh CPU copies
(``device_types=("cpu",)``, ``min_bytes=0``): every saved activation makes the round trip through the hooks, and
the losses and gradients must not change by a bit (a copy is exact). What the GPU saves is measured in the ``gpu``
tests at the end.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
import torch
from test_train_dpo import common_args, synthetic_pairs, tiny_model
from tiny_tokenizer import build_tiny_tokenizer

import fastdpo.model.packed as packed_module
from fastdpo.data import pack_pairs
from fastdpo.errors import ConfigError
from fastdpo.model.offload import ActivationOffload, HostResident, offload_activations
from fastdpo.ops import LossConfig
from fastdpo.train import DPOConfig, SFTConfig
from fastdpo.train.dpo import DPOTrainer
from fastdpo.train.sft import SFTTrainer
from fastdpo.train.step import preference_step


def _pairs(vocab: int, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(low, high))]

    return [{"prompt_ids": ids(2, 9), "chosen_ids": ids(1, 11), "rejected_ids": ids(3, 7)} for _ in range(count)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_step_has_the_same_loss_and_gradients(tmp_path, monkeypatch, checkpointing):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    batch = pack_pairs(_pairs(len(tokenizer), 5), pack_length=None, split_pairs=True)
    config = LossConfig(loss_type=["sigmoid"], beta=0.1)
    ref_logps = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)) - 20.0
    results = []
    for offload in (False, True):
        model = load()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        seen = _spy_offload(monkeypatch)
        out = preference_step(model, batch, config, ref_logps=ref_logps, offload_activations=offload)
        out.loss.backward()
        results.append((out.loss.detach(), _grads(model)))
        assert len(seen) == offload and all(context.offloaded_tensors > 0 for context in seen)
    (loss, grads), (offloaded_loss, offloaded_grads) = results
    assert torch.equal(loss, offloaded_loss)  # a host copy is exact: nothing may change
    assert grads.keys() == offloaded_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, offloaded_grads[name]), name


def test_what_the_hooks_move_and_keep():
    model = torch.nn.Linear(64, 64)
    hooks = ActivationOffload(model, min_bytes=1024, device_types=("cpu",))
    big = torch.randn(32, 64)  # 8 KiB
    assert hooks.pack(model.weight) is model.weight  # a parameter stays
    view = model.weight.t()
    assert hooks.pack(view) is view  # so does a view of one
    small = torch.randn(4)
    assert hooks.pack(small) is small and hooks.offloaded_tensors == 0  # under min_bytes: stays
    packed = hooks.pack(big)
    assert not isinstance(packed, torch.Tensor) and hooks.offloaded_tensors == 1
    assert hooks.offloaded_bytes == big.numel() * 4
    back = hooks.unpack(packed)
    assert torch.equal(back, big) and back.data_ptr() != big.data_ptr()
    # a dense tensor in another dimension order comes back with its strides (kernels may rely on the layout)
    permuted = torch.randn(16, 8, 24).permute(2, 0, 1)
    back = hooks.unpack(hooks.pack(permuted))
    assert torch.equal(back, permuted) and back.stride() == permuted.stride()
    # a view with gaps stays where it is: sdpa pads its mask to 8 columns and saves a narrower view, whose strides
    # a fresh copy would lose (the memory-efficient backward then refused the copy on a GPU)
    padded = torch.randn(4, 64, 72)[..., :66]
    assert hooks.pack(padded) is padded and hooks.offloaded_tensors == 2
    # the defaults move nothing that lives on a CPU: there is no other memory to move it to
    default = ActivationOffload(model)
    assert default.pack(big) is big and default.offloaded_tensors == 0


def test_offload_context_installs_the_hooks():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 64, generator=gen), torch.randn(128, 64, generator=gen)
    grads = []
    for offload in (False, True):
        w, inputs = weight.clone().requires_grad_(), x.clone().requires_grad_()
        if offload:
            with offload_activations(torch.nn.Module(), min_bytes=0, device_types=("cpu",)) as hooks:
                y = (inputs @ w).tanh().sum()
            assert hooks.offloaded_tensors >= 3  # inputs and w for the matmul's gradients, tanh's output
        else:
            y = (inputs @ w).tanh().sum()
        y.backward()
        grads.append((inputs.grad, w.grad))
    for plain, offloaded in zip(*grads, strict=True):
        assert torch.equal(plain, offloaded)


def _spy_offload(monkeypatch) -> list:
    seen = []
    real = packed_module._offload

    @contextmanager
    def spy(module, **_):
        with real(module, min_bytes=0, device_types=("cpu",)) as hooks:
            seen.append(hooks)
            yield hooks

    monkeypatch.setattr(packed_module, "_offload", spy)
    return seen


def _offloading_trainer(kind: str, tmp_path, offload: bool):
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    if kind == "dpo":
        args = DPOConfig(**{**common_args(tmp_path, f"dpo{offload}"), "gradient_checkpointing": True,
                            "activation_offloading": offload, "max_steps": 3})  # fmt: skip
        return DPOTrainer(load(), ref_model=load(), args=args, train_dataset=synthetic_pairs(8),
                          processing_class=tokenizer)  # fmt: skip
    args = SFTConfig(**sft_args(tmp_path, f"sft{offload}", activation_offloading=offload))
    return SFTTrainer(load(), args=args, train_dataset=prompt_completion_rows(8), processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_trainer_activation_offloading(tmp_path, monkeypatch, kind):
    logs = {}
    for offload in (False, True):
        seen = _spy_offload(monkeypatch)
        trainer = _offloading_trainer(kind, tmp_path, offload)
        trainer.train()
        logs[offload] = [log for log in trainer.state.log_history if "loss" in log]
        # the policy's body, once per training step (never the reference's pass: it saves nothing)
        assert len(seen) == (trainer.state.global_step if offload else 0) and trainer.state.global_step > 1
        assert all(hooks.offloaded_tensors > 0 for hooks in seen)
    names = ("loss", "grad_norm", *(("rewards/margins", "logps/chosen") if kind == "dpo" else ()))
    for plain, offloaded in zip(logs[False], logs[True], strict=True):
        for name in names:
            assert offloaded[name] == plain[name], name  # exact copies: identical steps


def test_host_resident_moves_the_weights_only_inside_the_block(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, tmp_path / "model")()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    resident = HostResident(model)
    tensors = [*model.parameters(), *model.buffers()]
    homes = [t.data_ptr() for t in tensors]
    with resident.on("cpu"):  # device copies, even where the host copies already are
        assert all(t.data_ptr() != home for t, home in zip(tensors, homes, strict=True))
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
    assert [t.data_ptr() for t in tensors] == homes  # the host copies are back in place
    for name, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[name]), name


def test_dpo_trainer_ref_offload(tmp_path, monkeypatch):
    from peft import LoraConfig

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    calls = []
    real_on = HostResident.on

    def on(self, device):
        calls.append(str(device))
        return real_on(self, device)

    monkeypatch.setattr(HostResident, "on", on)
    logs = {}
    for offload in (False, True):
        args = DPOConfig(**{**common_args(tmp_path, f"ref{offload}"), "ref_offload": offload, "max_steps": 3})
        trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        logs[offload] = [log for log in trainer.state.log_history if "loss" in log]
    assert calls == ["cpu"] * 3  # one reference pass per step, on the training device
    for plain, offloaded in zip(logs[False], logs[True], strict=True):
        assert offloaded["loss"] == plain["loss"] and offloaded["rewards/margins"] == plain["rewards/margins"]
    with pytest.raises(ConfigError, match="ref_offload"):
        DPOConfig(**common_args(tmp_path, "x"), ref_offload=True, precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="ref_offload"):
        DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "y"), ref_offload=True), train_dataset=data,
                   processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))  # fmt: skip


def test_padding_sorting_strategies_are_refused(tmp_path):
    for strategy in ("group_by_length", "batch_rebalance"):
        with pytest.raises(ConfigError, match="train_sampling_strategy"):
            DPOConfig(**common_args(tmp_path, "x"), train_sampling_strategy=strategy)


# --- on a GPU: what offloading saves


def _gpu_peak(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_activation_offloading_lowers_the_peak():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).cuda()
    batch = pack_pairs(_pairs(4096, 24, seed=1) * 8, pack_length=None, split_pairs=True).to("cuda")
    ref_logps = torch.full((batch.num_pairs, 2), -50.0, device="cuda")
    loss_config = LossConfig(loss_type=["sigmoid"], beta=0.1)
    peaks, grads = {}, {}
    for offload in (False, True):
        model.zero_grad(set_to_none=True)

        def step(offload=offload):
            preference_step(model, batch, loss_config, ref_logps=ref_logps, offload_activations=offload).loss.backward()

        peaks[offload] = _gpu_peak(step)
        grads[offload] = _grads(model)
    assert peaks[True] < 0.8 * peaks[False], peaks  # the saved activations of 8 layers, minus one in flight
    for name, grad in grads[False].items():  # attention's backward may add in another order on a GPU
        torch.testing.assert_close(grad, grads[True][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_host_resident_reference_leaves_the_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.train.step import reference_logps

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    expected_model = LlamaForCausalLM(config).eval()
    expected_model.load_state_dict(model.state_dict())
    expected_model.cuda()
    batch = pack_pairs(_pairs(4096, 6, seed=2), pack_length=None, split_pairs=True).to("cuda")
    resident = HostResident(model)
    assert all(p.is_pinned() for p in model.parameters())
    base = torch.cuda.memory_allocated()
    with resident.on("cuda"):
        got = reference_logps(model, batch)
    assert torch.cuda.memory_allocated() - base < 1 << 20  # the device copies are gone
    assert all(p.device.type == "cpu" for p in model.parameters())
    # the same weights on the same device: only kernel-level nondeterminism could differ
    torch.testing.assert_close(got, reference_logps(expected_model, batch), rtol=1e-6, atol=1e-5)
