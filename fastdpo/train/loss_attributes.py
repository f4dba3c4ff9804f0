"""The DPO loss settings as trainer attributes, as TRL 1.16 keeps them (``trainer.beta``, ``trainer.loss_weights``,
``trainer.ld_alpha``, ...): every step reads them, so a callback or a subclass may change them (a β schedule, a
weight set to 0 in place), and a new value is checked as the config's when the next step reads it."""

from __future__ import annotations

from fastdpo.errors import ConfigError
from fastdpo.ops import LossConfig

LOSS_ATTRIBUTES = ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "simpo_gamma",
                   "cpo_alpha")  # fmt: skip


class LossAttributes:
    """Trainer mixin: ``loss_config`` built from the attributes as they are at each step (``_set_loss_attributes``
    sets them from the config at construction)."""

    def _set_loss_attributes(self, config: LossConfig, ld_alpha: float | None) -> None:
        for name in LOSS_ATTRIBUTES:
            setattr(self, name, getattr(config, name))
        self.loss_weights = list(config.weights)  # (TRL's: one weight per loss type, 1.0 where none were given)
        self.ld_alpha = ld_alpha
        self._loss_types, self._built = config.loss_types, None

    @property
    def loss_types(self) -> list[str]:
        return list(self._loss_types)

    @loss_types.setter
    def loss_types(self, value) -> None:
        raise ConfigError(f"cannot become {value!r} on a built trainer: its reference (or none, for a reference-free "
                          "loss) was chosen for its loss types", column="loss_types",
                          fix="set DPOConfig(loss_type=...) and build the trainer with it")  # fmt: skip

    @property
    def loss_config(self) -> LossConfig:
        """The loss of the attributes as they are now (rebuilt, and checked, where one changed)."""
        weights = self.loss_weights
        weights = tuple(weights) if isinstance(weights, (list, tuple)) else weights  # (another kind: refused below)
        now = (*(getattr(self, name) for name in LOSS_ATTRIBUTES), weights)
        if self._built is None or self._built[0] != now:
            config = LossConfig(loss_type=list(self._loss_types), loss_weights=weights,
                                discopop_tau=self.args.discopop_tau,
                                **{name: getattr(self, name) for name in LOSS_ATTRIBUTES})  # fmt: skip
            self._built = (now, config)
            watch = getattr(self, "_displacement", None)
            if watch is not None and watch.beta is not None:  # (its ratio is rewards / β now)
                watch.beta = self.beta
        return self._built[1]

    def _step_ld_alpha(self) -> float | None:
        """``ld_alpha`` for this step; a ConfigError where it changed under a cached reference (computed with the
        config's, its values would be another weighting's)."""
        if self.ld_alpha != self.args.ld_alpha and getattr(self, "reference_mode", None) == "cached":
            raise ConfigError(f"changed from {self.args.ld_alpha} to {self.ld_alpha}, and the cached reference was "
                              f"computed with {self.args.ld_alpha}", column="ld_alpha",
                              fix="set ld_alpha in DPOConfig, or use a separate reference")  # fmt: skip
        return self.ld_alpha
