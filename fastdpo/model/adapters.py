"""PEFT adapters: a LoRA policy whose reference costs no second copy of the weights.

- A new adapter (``peft_config`` given): the reference is the base model, i.e. the policy with its adapters
  disabled, run under ``torch.no_grad()`` on the same packed batch.
- A model that is already a ``PeftModel`` with a trained adapter (e.g. after LoRA SFT): its adapter is copied into a
  frozen adapter named ``"ref"`` and the reference pass runs with that one active, so the reference is the SFT
  model, as TRL 1.16 does.

fastdpo computes log-probs from ``lm_head.weight`` directly, so an adapter on the LM head would never be applied or
trained: it is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fastdpo.errors import ConfigError

REFERENCE_ADAPTER = "ref"


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def wrap_with_adapter(model: nn.Module, peft_config, *, gradient_checkpointing: bool) -> nn.Module:
    """``get_peft_model(model, peft_config)``, checked and ready for training."""
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("needs the peft package", column="peft_config", fix="pip install 'fastdpo[peft]'") from error
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"expected a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}",
                          column="peft_config")  # fmt: skip
    _refuse_prompt_learning(peft_config)
    if is_peft_model(model):
        raise ConfigError("the model already has adapters and a peft_config was given too", column="peft_config",
                          fix="merge and unload the adapter first (merge_and_unload), or pass peft_config=None to "
                          "train the existing adapter")  # fmt: skip
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as error:  # (peft's checks: r ≥ 1, the dropout a probability, target modules the model has)
        raise ConfigError(f"peft refused it: {' '.join(str(error).split())}", column="peft_config",
                          fix="fix the LoRA settings: lora_r, lora_dropout, lora_target_modules") from None  # fmt: skip
    return prepare_adapter_model(model, gradient_checkpointing=gradient_checkpointing, new_adapter=True)


def refuse_unsupported_adapter(model, peft_config=None) -> None:
    """ConfigError for an adapter the packed forward cannot train: a prompt-learning one (prompt, prefix, P-tuning) in
    ``model`` (a PeftModel) or ``peft_config`` (its virtual tokens are added by ``PeftModel.forward``, which the
    packed forward does not run: the model would train no adapter, and evaluate as the bare base model), or a PeftModel
    none of whose parameters would train (``PeftModel.from_pretrained`` loads an adapter frozen, for inference,
    unless ``is_trainable=True``: training failed deep in autograd)."""
    _refuse_prompt_learning(model)
    _refuse_prompt_learning(peft_config)
    if is_peft_model(model) and not any(parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError("the PeftModel has no trainable parameter: PeftModel.from_pretrained loads its adapter "
                          "frozen, for inference", column="model",
                          fix="load it with PeftModel.from_pretrained(base, path, is_trainable=True)")  # fmt: skip


def refuse_frozen(model: nn.Module) -> None:
    """ConfigError, when training starts, for a model none of whose parameters would train (an adapter folder loaded
    by transformers attaches the adapter frozen): it failed deep in autograd, or took steps of gradient 0. A frozen
    model may still be evaluated."""
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError("the model has no trainable parameter (e.g. an adapter folder loaded by transformers, "
                          "which attaches the adapter frozen)", column="model",
                          fix="load an adapter with peft's AutoPeftModelForCausalLM.from_pretrained(path, "
                          "is_trainable=True) (or pass its folder's path), or unfreeze the model")  # fmt: skip


def _refuse_prompt_learning(config_or_model) -> None:
    configs = getattr(config_or_model, "peft_config", None)
    configs = configs.values() if isinstance(configs, dict) else [config_or_model]
    kinds = [str(getattr(c, "peft_type", type(c).__name__)) for c in configs if getattr(c, "is_prompt_learning", 0)]
    if kinds:
        raise ConfigError(f"prompt-learning adapters ({kinds[0].split('.')[-1]}) are not supported: their virtual "
                          "tokens are added by PeftModel.forward, which fastdpo's packed forward does not run",
                          column="peft_config", fix="use an adapter on the layers, e.g. LoraConfig")  # fmt: skip


def is_quantized(model: nn.Module) -> bool:
    """Loaded in 4 or 8 bits (bitsandbytes): the attributes transformers sets on such models."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_training(model: nn.Module) -> None:
    """QLoRA as TRL 1.16 sets it up: on a quantized base, the trainable adapter parameters in bf16 (the QLoRA paper's
    recipe), except DoRA's magnitude vectors (bf16 would swallow their small updates).

    And bitsandbytes' CPU inference layout kept off: on a CPU with AVX512-BF16, a 4-bit layer's first forward in
    eval mode without grad (an evaluation, a reference pass) repacks its weight for a kernel that has no backward,
    and every later training forward uses it: no gradient reaches the adapters from then on, silently (bitsandbytes
    0.50; layers narrower than 64 inputs or 32 outputs crash on that repacking instead). A layer repacked already
    (the model was run so before it was given) is unpacked, as bitsandbytes does before saving it."""
    if not is_quantized(model):
        return
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_magnitude_vector" not in name:
            parameter.data = parameter.data.to(torch.bfloat16)
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):  # repacked already (run in eval mode before): back
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)


def refuse_head_adapter(model: nn.Module) -> None:
    """A ConfigError for an adapter on the LM head, which fastdpo's fused head never trains (it reads the head's
    weight); nothing for a model without peft's adapters."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ConfigError("an adapter on the LM head would never be trained: fastdpo reads lm_head.weight directly",
                          column="peft_config", fix="remove 'lm_head' from target_modules")  # fmt: skip


def prepare_adapter_model(model: nn.Module, *, gradient_checkpointing: bool, new_adapter: bool) -> nn.Module:
    """Refuse an adapter on the LM head; copy a trained adapter into the frozen ``"ref"`` one; make checkpointing work
    with frozen embeddings (their outputs must require grad for the checkpointed layers to backpropagate)."""
    refuse_head_adapter(model)
    if not new_adapter and REFERENCE_ADAPTER not in model.peft_config:
        active = model.active_adapter
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config[active])
        for name, parameter in model.named_parameters():  # (trainable_token_indices' rows too: TRL 1.16 leaves them)
            if _of_adapter(name, active):
                model.get_parameter(_renamed(name, active, REFERENCE_ADAPTER)).data.copy_(parameter.data)
        for name, parameter in model.named_parameters():
            if _of_adapter(name, REFERENCE_ADAPTER):
                parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


@contextmanager
def adapter_reference(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` computes the reference: its ``"ref"`` adapter if it has one, else no adapter."""
    if REFERENCE_ADAPTER not in model.peft_config:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter(active)
        for name, parameter in model.named_parameters():  # set_adapter made "ref" trainable: freeze it again
            if _of_adapter(name, REFERENCE_ADAPTER):
                parameter.requires_grad_(False)


def _of_adapter(name: str, adapter: str) -> bool:
    """Whether the parameter ``name`` is adapter ``adapter``'s: ``...lora_A.<adapter>.weight``, or a ParameterDict's
    ``...trainable_tokens_delta.<adapter>`` (PEFT's ``trainable_token_indices``)."""
    return f".{adapter}." in name or name.endswith(f".{adapter}")


def _renamed(name: str, adapter: str, other: str) -> str:
    """``name`` of adapter ``adapter``'s parameter, as adapter ``other``'s."""
    if name.endswith(f".{adapter}"):
        return name[: -len(adapter)] + other
    return name.replace(f".{adapter}.", f".{other}.")


class AdapterReference(nn.Module):
    """A PEFT policy seen as its reference model: calls run it inside ``adapter_reference`` (its ``"ref"`` adapter,
    or no adapter), so the reference takes no second copy of the weights, quantized ones included."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, *args, **kwargs):
        with adapter_reference(self.model):
            return self.model(*args, **kwargs)
