"""How the ``fastdpo`` command speaks besides its output (``fastdpo.cli``'s, apart for its length): fastdpo's own
warnings, logged or warned, as one line each, ``fastdpo: warning: ...`` (they showed the Python file and line that
warned and its source line, or printed bare); other packages' notices that are not the user's to act on, quiet."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from pathlib import Path

# not the user's to fix: bitsandbytes' word, at its import on a CPU with AVX512-BF16 (every command that loads a
# model), that HF's optional `kernels` package is missing (it falls back to its own 4-bit CPU kernel); DeepSpeed's,
# where it is installed, that it found no GPU (on stdout, with its file and line, at every run on a CPU)
NOTICES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
           "DeepSpeed": "Setting accelerator to CPU."}  # fmt: skip
_PACKAGE = Path(__file__).resolve().parent


@contextlib.contextmanager
def speaking():
    """The command's way of speaking while it runs; Python's restored after (``cli.main`` runs in-process too)."""
    # nor TRL's field gradient_checkpointing (transformers 5 warns), nor on a CPU the Trainer's default
    # dataloader_pin_memory=True (torch warns at each data loader)
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator")
    for name in NOTICES:
        logging.getLogger(name).addFilter(_not_a_notice)  # (once: the same filter)
    shown, logger = warnings.formatwarning, logging.getLogger("fastdpo")
    warnings.formatwarning = functools.partial(_as_said, shown)
    said = logging.StreamHandler()
    said.setLevel(logging.WARNING)
    said.setFormatter(_Said())
    logger.addHandler(said)
    try:
        yield
    finally:
        warnings.formatwarning = shown
        logger.removeHandler(said)


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NOTICES.get(record.name, "\0"))


class _Said(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"fastdpo: {record.levelname.lower()}: {record.getMessage()}"


def _as_said(shown, message, category, filename, lineno, line=None) -> str:
    """A warning of fastdpo's code as one line; other packages' as Python shows them."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"fastdpo: warning: {message}\n"
    return shown(message, category, filename, lineno, line)
