"""The loss family against an independent transcription of each formula in plain Python floats."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from fastdpo.errors import ConfigError
from fastdpo.ops import LOSS_TYPES, LossConfig, PairLogps, preference_loss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def f_score(r: float, kind: str, alpha: float) -> float:
    if kind == "forward_kl":
        return 1 - math.exp(-r)
    if kind == "js_divergence":
        return math.log(2) + logsig(r)
    if kind == "alpha_divergence":
        return (math.exp(min((alpha - 1) * r, 80.0)) - 1) / (alpha - 1)
    return r


def expected_losses(loss_type, rows, *, beta, eps=0.0, tau=0.05, gamma=0.5, cpo_alpha=1.0, nll=None, f="reverse_kl",
                    f_alpha=0.5):  # fmt: skip
    """Per-pair losses for a batch of rows (pc, pr, rc, rr, lc, lr), each formula written out from its paper/TRL."""
    out = []
    sorted_policy = sorted(r[0] - r[1] for r in rows)
    sorted_ref = sorted(r[2] - r[3] for r in rows)
    sorted_c = sorted(r[0] - r[2] for r in rows)
    sorted_r = sorted(r[1] - r[3] for r in rows)
    sft = -sum(r[0] for r in rows) / sum(r[4] for r in rows)
    for i, (pc, pr, rc, rr, lc, lr) in enumerate(rows):
        sc, sr = f_score(pc - rc, f, f_alpha), f_score(pr - rr, f, f_alpha)
        d = beta * (sc - sr)
        uc, ur = beta * (pc - rc), beta * (pr - rr)
        mc, mr = pc / lc, pr / lr
        if loss_type == "sigmoid":
            v = -logsig(d)
        elif loss_type == "cdpo":
            v = -(1 - eps) * logsig(d) - eps * logsig(-d)
        elif loss_type == "robust":
            v = (-(1 - eps) * logsig(d) + eps * logsig(-d)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            v = max(0.0, 1 - d)
        elif loss_type == "ipo":
            v = (sc / lc - sr / lr - 1 / (2 * beta)) ** 2
        elif loss_type == "sigmoid_norm":
            v = -logsig(beta * (sc / lc - sr / lr))
        elif loss_type == "exo_pair":
            v = sig(d) * (logsig(d) - math.log(1 - eps)) + sig(-d) * (logsig(-d) - math.log(eps))
        elif loss_type == "nca_pair":
            v = -logsig(uc) - 0.5 * logsig(-uc) - 0.5 * logsig(-ur)
        elif loss_type == "bco_pair":
            v = -logsig(uc) - logsig(-ur)
        elif loss_type == "sppo_hard":
            v = (pc - rc - 1 / (2 * beta)) ** 2 + (pr - rr + 1 / (2 * beta)) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            x = beta * (sorted_policy[i] - sorted_ref[i] if loss_type == "aot" else sorted_c[i] - sorted_r[i])
            v = -(1 - eps) * logsig(x) - eps * logsig(-x)
        elif loss_type == "apo_zero":
            v = (1 - sig(uc)) + sig(ur)
        elif loss_type == "apo_down":
            v = sig(uc) + (1 - sig(uc - ur))
        elif loss_type == "discopop":
            m = sig(d / tau)
            v = -logsig(d) * (1 - m) + math.exp(-d) * m
        elif loss_type == "sft":
            v = sft
        elif loss_type == "simpo":
            x = beta * (mc - mr) - gamma
            v = -(1 - eps) * logsig(x) - eps * logsig(-x)
        elif loss_type == "cpo":
            x = beta * (pc - pr)
            v = -(1 - eps) * logsig(x) - eps * logsig(-x) + cpo_alpha * sft
        elif loss_type == "orpo":

            def log_odds(m):
                return m - math.log(1 - math.exp(m))

            v = nll - beta * logsig(log_odds(mc) - log_odds(mr))
        else:
            raise KeyError(loss_type)
        out.append(v)
    return out


def make_rows(n=5, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lc, lr = rng.randint(1, 40), rng.randint(1, 40)
        pc, pr = -rng.uniform(0.2, 2.5) * lc, -rng.uniform(0.2, 2.5) * lr
        rows.append((pc, pr, pc + rng.uniform(-6, 6), pr + rng.uniform(-6, 6), float(lc), float(lr)))
    return rows


def to_pairs(rows, nll=None, requires_grad=False):
    cols = torch.tensor(rows, dtype=torch.float64).T.contiguous()
    chosen, rejected = cols[0].clone().requires_grad_(requires_grad), cols[1].clone().requires_grad_(requires_grad)
    return PairLogps(
        chosen=chosen, rejected=rejected, ref_chosen=cols[2], ref_rejected=cols[3],
        chosen_tokens=cols[4], rejected_tokens=cols[5],
        chosen_nll=None if nll is None else torch.tensor(nll, dtype=torch.float64),
    )  # fmt: skip


CASES = [
    ("sigmoid", {}),
    ("cdpo", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.1}),
    ("hinge", {"beta": 0.3}),
    ("ipo", {"beta": 0.5}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("sppo_hard", {"beta": 0.7}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.1}),
    ("sft", {}),
    ("sigmoid_norm", {"beta": 2.0}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.3, "label_smoothing": 0.05}),
    ("cpo", {"cpo_alpha": 0.5, "label_smoothing": 0.1}),
    ("orpo", {}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("ipo", {"f_divergence_type": "js_divergence"}),
    ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
]


def test_every_loss_type_has_a_case():
    assert {name for name, _ in CASES} == set(LOSS_TYPES)


@pytest.mark.parametrize(("loss_type", "kw"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_value_and_gradient_match_transcription(loss_type, kw):
    rows = make_rows(seed=len(loss_type))
    nll = 1.37
    config = LossConfig(loss_type=loss_type, **kw)
    transcription_kw = {
        "beta": config.beta, "eps": config.label_smoothing, "tau": config.discopop_tau, "gamma": config.simpo_gamma,
        "cpo_alpha": config.cpo_alpha, "nll": nll, "f": config.f_divergence_type,
        "f_alpha": config.f_alpha_divergence_coef,
    }  # fmt: skip
    pairs = to_pairs(rows, nll=nll, requires_grad=True)
    out = preference_loss(pairs, config)
    want = expected_losses(loss_type, rows, **transcription_kw)
    # fp64 throughout; the transcription is a different order of operations, so allow a few ulps of the value
    torch.testing.assert_close(out.per_pair, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert math.isclose(out.loss.item(), sum(want) / len(want), rel_tol=1e-12, abs_tol=1e-12)

    # Gradient w.r.t. the policy log-probs against central differences of the transcription (h=1e-6 in fp64:
    # truncation error ~h² times the third derivative, rounding ~1e-16/h; 1e-6 relative covers both).
    out.loss.backward()
    for column, tensor in ((0, pairs.chosen), (1, pairs.rejected)):
        grad = torch.zeros_like(tensor) if tensor.grad is None else tensor.grad  # sft ignores the rejected
        for i in range(len(rows)):
            numeric = []
            for step in (1e-6, -1e-6):
                moved = [list(r) for r in rows]
                moved[i][column] += step
                numeric.append(sum(expected_losses(loss_type, moved, **transcription_kw)) / len(rows))
            fd = (numeric[0] - numeric[1]) / 2e-6
            assert math.isclose(grad[i].item(), fd, rel_tol=1e-6, abs_tol=1e-7), (column, i)


def test_known_values():
    # β = 0.1 and a log-ratio difference of 2: Δ = 0.2
    pairs = PairLogps(*(torch.tensor([v], dtype=torch.float64) for v in (-1.0, -3.0, -2.0, -2.0)))
    assert math.isclose(preference_loss(pairs, LossConfig()).loss.item(), 0.5981388694, abs_tol=1e-10)
    robust = LossConfig(loss_type="robust", label_smoothing=0.1)
    assert math.isclose(preference_loss(pairs, robust).loss.item(), 0.5731388694, abs_tol=1e-10)
    # TRL's sigmoid ignores label_smoothing; cdpo is the conservative variant
    smoothed = LossConfig(label_smoothing=0.1)
    assert math.isclose(preference_loss(pairs, smoothed).loss.item(), 0.5981388694, abs_tol=1e-10)
    cdpo = preference_loss(pairs, LossConfig(loss_type="cdpo", label_smoothing=0.1)).loss.item()
    assert math.isclose(cdpo, 0.9 * 0.5981388694 + 0.1 * 0.7981388694, abs_tol=1e-9)


def test_weighted_mixture_and_metrics():
    rows = make_rows(seed=3)
    pairs = to_pairs(rows)
    mixed = preference_loss(pairs, LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2]))
    alone = [preference_loss(pairs, LossConfig(loss_type=t)).loss for t in ("sigmoid", "sft")]
    torch.testing.assert_close(mixed.loss, 0.8 * alone[0] + 0.2 * alone[1])
    chosen_rewards = [0.1 * (r[0] - r[2]) for r in rows]
    rejected_rewards = [0.1 * (r[1] - r[3]) for r in rows]
    m = {k: v.item() for k, v in mixed.metrics.items()}
    assert math.isclose(m["rewards/chosen"], sum(chosen_rewards) / 5, rel_tol=1e-12)
    assert math.isclose(m["rewards/margins"], (sum(chosen_rewards) - sum(rejected_rewards)) / 5, rel_tol=1e-12)
    wins = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)) / 5
    assert m["rewards/accuracies"] == wins and 0 < wins < 1
    assert math.isclose(m["logps/chosen"], sum(r[0] for r in rows) / 5, rel_tol=1e-12)


def test_pair_weights_scale_each_pair():
    pairs = to_pairs(make_rows(seed=4))
    weights = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    plain = preference_loss(pairs, LossConfig(loss_type="ipo"))
    weighted = preference_loss(pairs, LossConfig(loss_type="ipo"), pair_weights=weights)
    torch.testing.assert_close(weighted.per_pair, plain.per_pair * weights)
    with pytest.raises(ValueError, match="^pair_weights:"):
        preference_loss(pairs, LossConfig(loss_type="aot"), pair_weights=weights)


@pytest.mark.parametrize(
    ("kw", "column", "hint"),
    [
        ({"loss_type": "sigmod"}, "loss_type", "did you mean 'sigmoid'"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights", "one weight per"),
        ({"loss_type": ["simpo", "sigmoid"]}, "loss_type", "reference-free"),
        ({"beta": 0.0}, "beta", "must be > 0"),
        ({"beta": -0.1}, "beta", "must be > 0"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing", "0.5"),
        ({"loss_type": "exo_pair"}, "label_smoothing", "1e-3"),
        ({"loss_type": "cdpo", "label_smoothing": 1.2}, "label_smoothing", r"\[0, 1\)"),
        ({"f_divergence_type": "kl"}, "f_divergence_type", "use one of|did you mean"),
        ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "f_divergence_type", "reverse_kl"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau", "0.05"),
        # NaN passed: every step's loss NaN (skipped by the numerics guard), or alpha NaN taken as reverse KL; a
        # weight that is no number failed in float() without naming the option
        ({"loss_type": "discopop", "discopop_tau": float("nan")}, "discopop_tau", "0.05"),
        ({"loss_type": "discopop", "f_alpha_divergence_coef": float("nan")}, "f_alpha_divergence_coef", "finite"),
        ({"loss_type": "simpo", "simpo_gamma": float("nan")}, "simpo_gamma", "finite"),
        ({"loss_type": "cpo", "cpo_alpha": float("inf")}, "cpo_alpha", "finite"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float("nan")]}, "loss_weights", "finite"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, "a"]}, "loss_weights", "expected a list of numbers"),
        ({"loss_type": "sigmoid", "loss_weights": 0.5}, "loss_weights", "expected a list of numbers, got 0.5"),
    ],
)
def test_bad_settings_raise_config_error(kw, column, hint):
    with pytest.raises(ConfigError, match=hint) as info:
        LossConfig(**kw)
    assert info.value.column == column and str(info.value).startswith(f"option '{column}'")


def test_options_a_type_does_not_read_are_not_checked_for_it():
    # sigmoid ignores label_smoothing and every type but discopop its tau, as TRL does (the trainers warn of an unused
    # label_smoothing): label_smoothing=1.0 beside sigmoid, which TRL trains, was refused
    assert LossConfig(loss_type="sigmoid", label_smoothing=1.0).label_smoothing == 1.0
    assert LossConfig(loss_type="ipo", discopop_tau=-1.0).loss_types == ("ipo",)


def test_missing_inputs_are_named():
    pairs = PairLogps(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="needs ref_chosen"):
        preference_loss(pairs, LossConfig())
    with pytest.raises(ValueError, match="needs chosen_tokens"):
        preference_loss(pairs, LossConfig(loss_type="simpo"))
    pairs.chosen_tokens = pairs.rejected_tokens = torch.ones(2)
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss(pairs, LossConfig(loss_type="orpo"))


def test_tr_dpo_settings_are_checked_and_unused_loss_options_said(tmp_path):
    # ref_model_sync_steps=0 failed after the first optimizer step (ZeroDivisionError in on_step_end; TRL's too);
    # mixup α = 2 extrapolated the reference (2·policy − reference) silently; label_smoothing with a type that has no
    # ε, and cpo_alpha with simpo (TRL's CPO-SimPO adds cpo_alpha · NLL), changed nothing, silently
    import warnings

    from fastdpo.train import DPOConfig

    base = {"output_dir": str(tmp_path), "report_to": [], "bf16": False, "use_cpu": True}
    for bad, column in (({"ref_model_sync_steps": 0}, "ref_model_sync_steps"),
                        ({"ref_model_mixup_alpha": 2.0}, "ref_model_mixup_alpha")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"^option '{column}'"):
            DPOConfig(**base, sync_ref_model=True, **bad)
        DPOConfig(**base, **bad)  # (not used without sync_ref_model)
    for options, said in (({"label_smoothing": 0.2}, "label_smoothing=0.2 is not used by loss_type ['sigmoid']"),
                          ({"loss_type": ["simpo"], "cpo_alpha": 0.5}, "loss_type=['simpo', 'sft'], loss_weights=[1, "
                                                                       "0.5]")):  # fmt: skip
        with pytest.warns(UserWarning, match=re.escape(said)):
            DPOConfig(**base, **options)
    with warnings.catch_warnings(record=True) as caught:  # smoothed types, and cpo_alpha with cpo: nothing said
        warnings.simplefilter("always")
        DPOConfig(**base, loss_type=["cdpo"], label_smoothing=0.2)
        DPOConfig(**base, loss_type=["cpo"], cpo_alpha=0.5)
        DPOConfig(**base, loss_type=["simpo"], cpo_alpha=0.0)  # (TRL's CPO trainer's SimPO: what simpo is)
    assert not [w for w in caught if "label_smoothing" in str(w.message) or "cpo_alpha" in str(w.message)]
