"""fastdpo's Liger-compatible losses against Liger-Kernel 0.8.5's own modules on identical tensors (CPU, eager).

Both compute in fp32 (Liger casts its logits to fp32): values and gradients agree to fp32 rounding of sums taken
in another order (Liger's full log_softmax per chunk of pairs, fastdpo's chunked log-sum-exp). A second check
holds fastdpo in fp64 against a plain full-logits computation in fp64.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fastdpo.errors import ConfigError
from fastdpo.ops import FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss

liger = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 3, 7, 16, 53  # odd on purpose


def tensors(dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.3
    ref_hidden = hidden + 0.1 * torch.randn(2 * B, T, H, generator=gen, dtype=torch.float64)
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=gen, dtype=torch.float64)
    target = torch.randint(0, V, (2 * B, T), generator=gen)
    for row in range(2 * B):  # a prompt of 1-3 ignored positions, and row-end padding on some rows
        target[row, : 1 + row % 3] = -100
        if row % 2:
            target[row, T - 1 - row % 3 :] = -100
    values = {"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden, "ref_weight": ref_weight,
              "bias": torch.randn(V, generator=gen, dtype=torch.float64) * 0.1 if bias else None}  # fmt: skip
    return {k: (None if v is None else v.to(dtype)) for k, v in values.items()}, target


def run(module, values, target, **extra):
    """The module's outputs and the gradients of its loss (w.r.t. the policy hidden states, head weight, bias)."""
    leaves = {k: values[k].clone().requires_grad_() for k in ("hidden", "weight", "bias") if values[k] is not None}
    loss, aux = module(leaves["weight"], leaves["hidden"], target, leaves.get("bias"), **extra)
    loss.backward()
    return loss.detach(), [a.detach() for a in aux], {k: v.grad for k, v in leaves.items()}


def assert_same(ours, theirs, rtol=1e-5, atol=1e-6):
    (loss, aux, grads), (their_loss, their_aux, their_grads) = ours, theirs
    torch.testing.assert_close(loss, their_loss, rtol=rtol, atol=atol)
    assert len(aux) == len(their_aux)
    for index, (got, want) in enumerate(zip(aux, their_aux, strict=True)):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, msg=f"output {index}")
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol, msg=name)


DPO_CASES = [
    {"loss_type": "sigmoid"},
    {"loss_type": "sigmoid", "average_log_prob": True},
    {"loss_type": "sigmoid", "compute_nll_loss": True, "alpha": 0.5},
    {"loss_type": "sigmoid", "use_ref_model": False},
    {"loss_type": "hinge"},
    {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    {"loss_type": "nca_pair"},
    {"loss_type": "robust", "label_smoothing": 0.1},
    {"loss_type": "bco_pair"},
    {"loss_type": "sppo_hard"},
    {"loss_type": "apo_zero"},
    {"loss_type": "apo_down"},
    {"loss_type": "discopop", "discopop_tau": 0.1},
]


@pytest.mark.parametrize("options", DPO_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_dpo_matches_liger(options):
    values, target = tensors()
    ref = {"ref_input": values["ref_hidden"], "ref_weight": values["ref_weight"]}
    theirs = run(liger.LigerFusedLinearDPOLoss(beta=0.2, compiled=False, chunk_size=2, **options), values, target,
                 **ref)  # fmt: skip
    ours = run(FusedLinearDPOLoss(beta=0.2, **options), values, target, **ref)
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    ("ours_cls", "theirs_name", "options"),
    [(FusedLinearCPOLoss, "LigerFusedLinearCPOLoss", {}),
     (FusedLinearCPOLoss, "LigerFusedLinearCPOLoss", {"average_log_prob": True, "label_smoothing": 0.1}),
     (FusedLinearSimPOLoss, "LigerFusedLinearSimPOLoss", {"gamma": 0.3, "label_smoothing": 0.05}),
     (FusedLinearSimPOLoss, "LigerFusedLinearSimPOLoss", {"compute_nll_loss": False}),
     (FusedLinearORPOLoss, "LigerFusedLinearORPOLoss", {}),
     (FusedLinearORPOLoss, "LigerFusedLinearORPOLoss", {"compute_nll_loss": False})],
)  # fmt: skip
def test_reference_free_modules_match_liger(ours_cls, theirs_name, options):
    values, target = tensors(seed=1)
    theirs = run(getattr(liger, theirs_name)(beta=0.2, compiled=False, **options), values, target)
    ours = run(ours_cls(beta=0.2, **options), values, target)
    assert_same(ours, theirs)


def test_orpo_nll_target_matches_liger():
    values, target = tensors(seed=2, bias=False)
    nll_target = torch.where(target == -100, torch.randint(0, V, target.shape), target)  # prompts scored as well
    theirs = run(liger.LigerFusedLinearORPOLoss(beta=0.1, compiled=False), values, target, nll_target=nll_target)
    ours = run(FusedLinearORPOLoss(beta=0.1), values, target, nll_target=nll_target)
    assert_same(ours, theirs)


def naive_dpo(values, target, beta, loss_type, average=False):
    """fp64, full logits: the loss of the padded rows; ``average``: Liger's ``average_log_prob`` (the log-probs are
    means over each row's tokens), which the types that average by themselves (ipo, sigmoid_norm, sft) do anyway."""

    def logps(hidden, weight, bias):
        logits = hidden @ weight.T + (0 if bias is None else bias)
        token = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        mask = target != -100
        return (token * mask).sum(-1), mask.sum(-1)

    policy, counts = logps(values["hidden"], values["weight"], values["bias"])
    ref, _ = logps(values["ref_hidden"], values["ref_weight"], None)
    if loss_type == "sft":  # TRL's: the token mean of the chosen rows' NLL
        return -policy[:B].sum() / counts[:B].sum()
    if average or loss_type in ("ipo", "sigmoid_norm"):  # (TRL's ipo and sigmoid_norm: log-ratios of token means)
        policy, ref = policy / counts, ref / counts
    margin = (policy[:B] - ref[:B]) - (policy[B:] - ref[B:])
    if loss_type == "ipo":
        return ((margin - 1 / (2 * beta)) ** 2).mean()
    return -F.logsigmoid(beta * margin).mean()


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "sft"])  # (Liger has none but sigmoid)
def test_dpo_in_fp64_against_full_logits(loss_type, average):
    # average_log_prob gave ipo, sigmoid_norm and sft means that they divided by the lengths again (sft 0.85 where 4.25)
    values, target = tensors(torch.float64, seed=3)
    leaves = {k: values[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    expected = naive_dpo({**values, **leaves}, target, 0.2, loss_type, average)
    expected.backward()
    want = {k: v.grad.clone() for k, v in leaves.items()}
    ours = run(FusedLinearDPOLoss(beta=0.2, loss_type=loss_type, average_log_prob=average), values, target,
               ref_input=values["ref_hidden"], ref_weight=values["ref_weight"])  # fmt: skip
    torch.testing.assert_close(ours[0], expected.detach(), rtol=1e-12, atol=1e-12)
    for name, grad in want.items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    # the rewards returned are of the log-probs returned (means with average_log_prob), whatever the type
    sigmoid = run(FusedLinearDPOLoss(beta=0.2, average_log_prob=average), values, target,
                  ref_input=values["ref_hidden"], ref_weight=values["ref_weight"])  # fmt: skip
    for index in (0, 1, 5, 6):  # chosen and rejected log-probs, chosen and rejected rewards
        torch.testing.assert_close(ours[1][index], sigmoid[1][index], rtol=1e-12, atol=1e-12)


def test_bad_calls_name_the_argument():
    values, target = tensors()
    with pytest.raises(ConfigError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="sigmod")
    with pytest.raises(ConfigError, match="label_smoothing"):
        FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.6)
    with pytest.raises(ConfigError, match="ref_input"):
        FusedLinearDPOLoss()(values["weight"], values["hidden"], target)
    with pytest.raises(ConfigError, match="_input"):
        FusedLinearDPOLoss(use_ref_model=False)(values["weight"], values["hidden"][:5], target[:5])
    with pytest.raises(ConfigError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="simpo")


def test_dpo_default_runs_the_three_gemm_pair_loss(monkeypatch):
    import fastdpo.ops.fused_linear as module

    calls = []
    real = module.fused_pair_loss

    def spy(*args, **kwargs):
        calls.append(kwargs.get("return_logps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "fused_pair_loss", spy)
    values, target = tensors()
    ref = {"ref_input": values["ref_hidden"], "ref_weight": values["ref_weight"]}
    run(FusedLinearDPOLoss(), values, target, **ref)
    assert calls == [True]  # sums, no NLL term: the fused op
    run(FusedLinearDPOLoss(average_log_prob=True), values, target, **ref)
    run(FusedLinearDPOLoss(compute_nll_loss=True), values, target, **ref)
    assert calls == [True]  # means or an NLL term: log-probs, then the loss
