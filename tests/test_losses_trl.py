"""Parity with TRL 1.16's own loss code on identical inputs.

TRL has no standalone DPO loss function: its losses are inline in ``DPOTrainer._compute_loss``. We call that
method on a bare trainer object whose model is a stub returning chosen per-token log-probs, with the reference
log-probs passed as precomputed; CPO/SimPO and ORPO have loss methods of their own (experimental trainers).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from fastdpo.ops import LossConfig, PairLogps, preference_loss

trl = pytest.importorskip("trl")

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

DPO_TYPES = [
    ("sigmoid", {}),
    ("hinge", {}),
    ("ipo", {"beta": 0.5}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}),
    ("sft", {}),
    ("sigmoid_norm", {}),
    (["sigmoid", "sft", "ipo"], {"loss_weights": [0.7, 0.2, 0.1]}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid_norm", {"f_divergence_type": "js_divergence"}),
    ("robust", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.4, "label_smoothing": 0.2}),
]


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _batch(b=6, t=23, seed=0, dtype=torch.float64):
    """A padded batch as TRL builds it: [chosen; rejected] rows, completion masks, per-token log-probs."""
    gen = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for row in range(2 * b):
        start = int(torch.randint(2, 8, (1,), generator=gen))
        stop = int(torch.randint(start + 1, t + 1, (1,), generator=gen))
        completion[row, start:stop] = 1
    # A model's per-token log-probs are 0 where the label is ignored (TRL's fused head and ours alike)
    per_token = -torch.rand(2 * b, t - 1, generator=gen, dtype=dtype) * 3 * completion[:, 1:]
    ref = -torch.rand(2 * b, generator=gen, dtype=dtype) * 20 - 5
    return completion, per_token, ref


def _trl_dpo_loss(loss_type, kw, completion, per_token, ref):
    args = trl.DPOConfig(output_dir="unused", report_to="none", bf16=False, loss_type=loss_type, **kw)
    trainer = object.__new__(trl.DPOTrainer)
    outputs = types.SimpleNamespace(
        log_probs=per_token.clone().requires_grad_(),
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    trainer.model = types.SimpleNamespace(training=True)
    trainer.args = args
    trainer.accelerator = _Accelerator()
    trainer.beta, trainer.loss_types = args.beta, args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer.label_smoothing, trainer.ld_alpha = args.label_smoothing, None
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = args.f_divergence_type, args.f_alpha_divergence_coef
    trainer.precompute_ref_logps, trainer.use_weighting, trainer.aux_loss_enabled = True, False, False
    trainer._metrics = {"train": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    b = completion.shape[0] // 2
    inputs = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": ref[:b],
        "ref_rejected_logps": ref[b:],
    }
    loss = trainer._compute_loss(lambda **_: outputs, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, outputs.log_probs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, grad, metrics


@pytest.mark.parametrize(("loss_type", "kw"), DPO_TYPES, ids=lambda v: str(v))
def test_dpo_types_match_trl(loss_type, kw):
    # TRL's alpha-divergence clamp has no fp64 entry (KeyError): that case runs in fp32 on both sides
    fp32 = kw.get("f_divergence_type") == "alpha_divergence"
    completion, per_token, ref = _batch(seed=len(str(loss_type)), dtype=torch.float32 if fp32 else torch.float64)
    rel = 1e-5 if fp32 else 1e-6
    trl_loss, trl_grad, trl_metrics = _trl_dpo_loss(loss_type, kw, completion, per_token, ref)

    # Ours from per-sequence sums of the same per-token log-probs
    b = completion.shape[0] // 2
    per_token = per_token.clone().requires_grad_()
    sums = per_token.sum(1)
    lengths = completion[:, 1:].sum(1).to(per_token.dtype)
    pairs = PairLogps(
        chosen=sums[:b], rejected=sums[b:], ref_chosen=ref[:b], ref_rejected=ref[b:],
        chosen_tokens=lengths[:b], rejected_tokens=lengths[b:],
    )  # fmt: skip
    out = preference_loss(pairs, LossConfig(loss_type=loss_type, **kw))
    (grad,) = torch.autograd.grad(out.loss, per_token)
    # Same inputs, same formulas up to operation order: agreement to 1e-6 (the bar; 1e-5 in fp32).
    # Gradients are compared on completion tokens: elsewhere the model's log-probs are constant zeros.
    assert abs(out.loss.item() - trl_loss.item()) <= rel * max(1.0, abs(trl_loss.item()))
    mask = completion[:, 1:].bool()
    torch.testing.assert_close(grad[mask], trl_grad[mask], rtol=rel, atol=rel * 1e-3)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert abs(out.metrics[name].item() - trl_metrics[name]) <= rel * max(1.0, abs(trl_metrics[name])), name


def _cpo_self(loss_type, beta, label_smoothing, simpo_gamma=0.5):
    return types.SimpleNamespace(
        alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
        accelerator=_Accelerator(),
    )  # fmt: skip


def test_simpo_and_cpo_match_trl_cpo_trainer():
    completion, per_token, _ = _batch(seed=11)
    b = completion.shape[0] // 2
    sums = per_token.sum(1)
    lengths = completion[:, 1:].sum(1).double()
    pairs = PairLogps(
        chosen=sums[:b], rejected=sums[b:], chosen_tokens=lengths[:b], rejected_tokens=lengths[b:]
    )  # fmt: skip
    means = sums / lengths

    # SimPO: TRL's CPO trainer with loss_type="simpo", cpo_alpha=0, on length-averaged log-probs
    losses, chosen_r, _ = CPOTrainer.cpo_loss(_cpo_self("simpo", 2.0, 0.1, 0.8), means[:b], means[b:])
    ours = preference_loss(pairs, LossConfig(loss_type="simpo", beta=2.0, label_smoothing=0.1, simpo_gamma=0.8))
    torch.testing.assert_close(ours.per_pair, losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, rtol=1e-9, atol=1e-12)
    # TRL's CPO trainer logs its chosen NLL (the token mean over chosen completions) under CPO-SimPO, fastdpo's
    # ['simpo', 'sft'] (under plain SimPO a 0: not logged here)
    nll = -per_token[:b][completion[:b, 1:].bool()].mean()
    assert "nll_loss" not in ours.metrics
    both = LossConfig(loss_type=["simpo", "sft"], loss_weights=[1.0, 0.7], beta=2.0, label_smoothing=0.1,
                      simpo_gamma=0.8)  # fmt: skip
    assert abs(preference_loss(pairs, both).metrics["nll_loss"].item() - nll.item()) <= 1e-12

    # CPO: sigmoid on summed log-probs + cpo_alpha · NLL, TRL's NLL being the token mean over chosen completions
    losses, chosen_r, _ = CPOTrainer.cpo_loss(_cpo_self("sigmoid", 0.1, 0.05), sums[:b], sums[b:])
    ours = preference_loss(pairs, LossConfig(loss_type="cpo", beta=0.1, label_smoothing=0.05, cpo_alpha=0.7))
    assert abs(ours.loss.item() - (losses.mean() + 0.7 * nll).item()) <= 1e-9
    assert abs(ours.metrics["nll_loss"].item() - nll.item()) <= 1e-12


def test_orpo_matches_trl_orpo_trainer():
    completion, per_token, _ = _batch(seed=12)
    b = completion.shape[0] // 2
    sums = per_token.sum(1)
    lengths = completion[:, 1:].sum(1).double()
    means = sums / lengths
    nll = torch.tensor(1.234, dtype=torch.float64)  # TRL's prompt+chosen cross-entropy, given as is
    orpo_self = types.SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    losses, chosen_r, _, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(orpo_self, means[:b], means[b:])
    pairs = PairLogps(
        chosen=sums[:b], rejected=sums[b:], chosen_tokens=lengths[:b], rejected_tokens=lengths[b:], chosen_nll=nll
    )  # fmt: skip
    ours = preference_loss(pairs, LossConfig(loss_type="orpo", beta=0.25))
    # TRL's odds-ratio loss casts to fp32, ours stays fp64: agreement to the 1e-6
    assert abs(ours.loss.item() - (nll - losses.mean()).item()) <= 1e-6
    torch.testing.assert_close(ours.chosen_rewards, chosen_r.double(), rtol=1e-6, atol=1e-9)
    assert abs(ours.metrics["log_odds_ratio"].item() - log_odds_ratio.item()) <= 1e-6
    assert abs(ours.metrics["log_odds_chosen"].item() - log_odds_chosen.item()) <= 1e-6
