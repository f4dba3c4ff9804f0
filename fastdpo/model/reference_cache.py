"""Reference log-probs computed once over a dataset, stored on disk, reused across runs and beta sweeps.

    logps = cached_reference_logps(reference, tokenized, cache_dir="~/.cache/fastdpo/reference_logps",
                                   tokenizer=tokenizer, max_length=1024)   # [rows, 2] (chosen, rejected)

The reference model runs once over the dataset (packed batches, no grad, a progress bar) and the per-pair sums
are written as an Arrow file named by a key: a fingerprint of everything the values depend on — the model's
weights and config, the tokenizer, the tokenized rows (every id, in order), the truncation settings and the mixed
precision they were computed under (a trainer computes them under its autocast, as its own passes run). A later
call with the same key reads the file and runs no reference forward at all; any change of key computes a new
file. A file is used only if its embedded key, row count and checksum match and every value is finite; anything
else (a truncated or corrupted file, a stale one) is reported with a warning and rebuilt, never used. Files are
written atomically (``fastdpo.atomic``), so an interrupted run leaves no half file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdpo.atomic import atomic_open
from fastdpo.data.packing import pack_pairs
from fastdpo.errors import ConfigError
from fastdpo.model.packed import ld_weights, packed_logps

logger = logging.getLogger(__name__)
FORMAT = "fastdpo-reference-logps-1"
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def default_cache_dir() -> Path:
    """``$FASTDPO_CACHE/reference_logps``, else ``$XDG_CACHE_HOME/fastdpo/...``, else ``~/.cache/fastdpo/...``."""
    root = os.environ.get("FASTDPO_CACHE") or None
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # (an empty or relative XDG_CACHE_HOME is unset, as the XDG spec says: it wrote into the current folder)
        root = os.path.join(xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "fastdpo")
    return Path(root).expanduser() / "reference_logps"


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes, bytes) and of ``config_fingerprint``'s."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(config_fingerprint(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # (reshaped: a 0-dim tensor, a learned scalar, has no byte view)
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config (but where it was loaded from: the same weights elsewhere give the same values),
    of its PEFT adapters' configs (LoRA's alpha and rsLoRA scale the adapter: the same weights give other
    log-probs), and of the attention implementation in effect and the device (their rounding differs: a policy
    still equal to its reference has margins of exactly 0 on its own only)."""
    digest = hashlib.blake2b(digest_size=16)
    while isinstance(getattr(model, "module", None), nn.Module):  # a DeepSpeed engine (its .config: DeepSpeed's), DDP
        model = model.module
    config = getattr(model, "config", None)  # (a PEFT model's: its base model's)
    if hasattr(config, "to_json_string"):
        settings = json.loads(config.to_json_string(use_diff=False))
        settings.pop("_name_or_path", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        digest.update(f"attention: {getattr(config, '_attn_implementation', None)}".encode())
    adapters = getattr(model, "peft_config", None)
    if isinstance(adapters, dict):
        for name, adapter in sorted(adapters.items()):
            settings = dict(adapter.to_dict() if hasattr(adapter, "to_dict") else vars(adapter))
            settings.pop("base_model_name_or_path", None)  # (where the base was loaded from, as the config's)
            digest.update(f"adapter {name}: {json.dumps(settings, sort_keys=True, default=str)}".encode())
    device = next((tensor.device.type for tensor in model.parameters()), "cpu")
    digest.update(f"device: {device}".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, special tokens and chat template (None: no tokenizer given)."""
    if tokenizer is None:
        return "none"
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.blake2b(json.dumps(state, sort_keys=True).encode(), digest_size=16).hexdigest()


def rows_fingerprint(rows) -> tuple[str, int]:
    """A hash of the token ids of every row, in order, and the number of rows.

    ``rows``: a ``datasets.Dataset`` (hashed column by column from Arrow, in the dataset's order, fast) or any
    sequence of dicts.
    """
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    table = None
    if hasattr(rows, "with_format") and hasattr(rows, "column_names"):
        table = rows.with_format("arrow")[0 : len(rows)]  # applies any select/shuffle indices: logical order
    for name in TOKEN_COLUMNS:
        if table is not None:
            column = table.column(name).combine_chunks()
            offsets = column.offsets.to_numpy().astype("int64")
            flat = column.flatten().to_numpy().astype("int64")
        else:
            lists = [rows[i][name] for i in range(len(rows))]
            offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in lists])]).astype("int64")
            flat = np.fromiter((t for ids in lists for t in ids), dtype="int64", count=int(offsets[-1]))
        digest.update(name.encode())
        digest.update((offsets - offsets[0]).tobytes())
        digest.update(flat.tobytes())
    return digest.hexdigest(), len(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Computing and caching
# ---------------------------------------------------------------------------------------------------------------------


def compute_reference_logps(
    reference: nn.Module,
    rows,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    head_impl: str = "auto",
    progress: bool = True,
    ld_alpha: float | None = None,
) -> Tensor:
    """``[rows, 2]`` fp32 (chosen, rejected) completion log-prob sums of ``reference``, no grad, packed batches.

    ``rows`` is anything indexable holding ``prompt_ids``/``chosen_ids``/``rejected_ids`` (a tokenized dataset);
    ``ld_alpha``: LD-DPO's weighted sums (``fastdpo.ops.segments.ld_token_weights``).
    """
    from fastdpo.ops.segments import pair_segments

    was_training = reference.training
    reference.eval()
    out = torch.empty(len(rows), 2, dtype=torch.float32)
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch")
    try:
        with torch.no_grad():
            for start in starts:
                examples = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
                batch = pack_pairs(examples, pack_length=None, max_length=max_length, truncation_mode=truncation_mode,
                                   split_pairs=True, row_ids=list(range(start, start + len(examples))))  # fmt: skip
                pairs = pair_segments(batch.cu_seqlens, batch.seq_pair, batch.seq_is_chosen)
                weights = None if ld_alpha is None else ld_weights(batch, pairs, ld_alpha)
                logps = packed_logps(reference, batch, impl=head_impl, token_weights=weights).seq_logps
                values = logps[pairs.to(logps.device)].float().cpu()  # [P, 2] in pair order
                out[[start + i for i in batch.pair_ids]] = values
    finally:
        reference.train(was_training)
    return out


def cache_key(
    reference: nn.Module,
    rows,
    *,
    tokenizer,
    max_length: int | None,
    truncation_mode: str,
    ld_alpha: float | None = None,
    autocast: str | None = None,
    adapter_off: bool = False,
) -> dict:
    """What the cached values depend on; its hash names the file (``ld_alpha``, ``autocast`` and ``adapter_off``
    only when set; ``adapter_off``: a PEFT model computed them with its adapter off, or its "ref" adapter; the
    attention implementation and the device are the model's fingerprint's)."""
    data, count = rows_fingerprint(rows)
    key = {"format": FORMAT, "model": model_fingerprint(reference), "tokenizer": tokenizer_fingerprint(tokenizer),
           "rows": data, "num_rows": count, "max_length": max_length, "truncation_mode": truncation_mode}  # fmt: skip
    if ld_alpha is not None:
        key["ld_alpha"] = float(ld_alpha)
    if autocast is not None:
        key["autocast"] = str(autocast)
    if adapter_off:
        key["adapter"] = "off"
    return key


def cached_reference_logps(
    reference: nn.Module,
    rows,
    *,
    cache_dir: str | os.PathLike | None = None,
    tokenizer=None,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    head_impl: str = "auto",
    progress: bool = True,
    ld_alpha: float | None = None,
    autocast: str | None = None,
    adapter_off: bool = False,
    processes=None,
) -> Tensor:
    """``[rows, 2]`` reference log-probs: read from the cache when a valid file has this key, else computed and
    written. See the module docstring. The mixed precision the values are computed under (``"bf16"``, ``"fp16"``: the
    caller's ``torch.autocast`` for the reference's device) is a part of the key, read from the autocast in effect;
    ``autocast``, where given, must agree with it (a label alone keyed fp32 values as bf16, and the other way round).
    ``adapter_off``: the caller runs a PEFT ``reference`` with its adapter off (``adapter_reference``), a part of
    the key. ``processes``: an ``accelerate.Accelerator`` of several processes, every one of which calls this with
    the same rows: each computes its share of the rows (``_shared_pass``) unless every one reads the file, and the
    first writes it."""
    actual = autocast_in_effect(reference)
    if autocast is not None and autocast != actual:
        warnings.warn(f"cached_reference_logps(autocast={autocast!r}) but the autocast in effect is {actual}: the "
                      f"values are keyed as computed, {actual}", stacklevel=2)  # fmt: skip
    key = cache_key(reference, rows, tokenizer=tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                    ld_alpha=ld_alpha, autocast=actual, adapter_off=adapter_off)  # fmt: skip
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / f"{name}.arrow"
    values = None
    try:
        present = path.exists()
    except OSError:  # (a folder above it that cannot be entered: computed, and its write warned about)
        present = False
    if present:
        values, problem = read_cache(path, key)
        if values is not None:
            logger.info("reference log-probs: %d rows read from %s", len(values), path)
        else:
            warnings.warn(f"reference log-prob cache {path} is not usable ({problem}): computed again", stacklevel=2)
    several = processes is not None and processes.num_processes > 1
    if several and not _everyone(processes, values is not None):  # (a node without the file: all compute it)
        values = None
    if values is not None:
        return values
    options = {"max_length": max_length, "truncation_mode": truncation_mode, "batch_size": batch_size,
               "head_impl": head_impl, "ld_alpha": ld_alpha}  # fmt: skip
    if several:
        values = _shared_pass(processes, reference, rows, progress=progress and processes.is_main_process, **options)
    else:
        values = compute_reference_logps(reference, rows, progress=progress, **options)
    if not bool(torch.isfinite(values).all()):
        bad = torch.nonzero(~torch.isfinite(values).all(1)).flatten()[:5].tolist()
        raise ConfigError(f"reference log-probs are not finite at rows {bad} of the {len(values)} prepared rows: the "
                          "reference model overflows there", column="reference",
                          fix="compute the reference in fp32 (bf16: false, or a float32 ref_model), or check its "
                          "weights (a separate reference overflows on those rows too)")  # fmt: skip
    try:
        if not several or processes.is_local_main_process:  # (one writer a machine: the folder may be its own)
            write_cache(path, key, values)
    except OSError as error:  # (after the whole pass: the values are good, only the reuse is lost)
        why = error.strerror or error
        warnings.warn(f"reference log-probs not cached: {path.parent} cannot be written ({why}); set ref_cache_dir "
                      "(or FASTDPO_CACHE) to a writable folder to reuse them", stacklevel=2)  # fmt: skip
    if several:
        processes.wait_for_everyone()  # (the file complete before any process goes on: a later run reads it)
    return values


def _everyone(processes, flag: bool) -> bool:
    """Whether ``flag`` holds on every process of ``processes``."""
    flags = processes.gather(torch.tensor([int(flag)], device=processes.device))
    return bool(flags.min())


def _shared_pass(processes, reference: nn.Module, rows, *, progress: bool, **options) -> Tensor:
    """``compute_reference_logps`` of ``rows`` on several processes: each computes one contiguous share, as many
    rows each (the last share padded with its own rows: every process runs as many batches), and all gather them,
    in order. One process computed every row before while the others waited, on NCCL as long as ``ddp_timeout``."""
    count, world, rank = len(rows), processes.num_processes, processes.process_index
    share = -(-count // world)
    mine = list(range(min(rank * share, count), min((rank + 1) * share, count)))
    padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
    part = rows.select(padded) if hasattr(rows, "select") else [rows[i] for i in padded]
    values = compute_reference_logps(reference, part, progress=progress, **options)
    gathered = processes.gather(values.to(processes.device)).cpu()  # [world * share, 2], process by process
    return gathered[:count]  # (every share before the last rows' is full: the rows in order, padding after)


@contextlib.contextmanager
def on_device(model: nn.Module, device) -> Iterator[None]:
    """``model`` on ``device`` within the block, and back where it was after: the policy a cached reference runs,
    which the Trainer leaves where it was loaded under DeepSpeed and FSDP (it places the model itself later); the
    pass ran there, on the host. Left alone: a model on several devices, quantized, or with meta tensors."""
    devices = {parameter.device for parameter in model.parameters()}
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    if len(devices) != 1 or devices == {torch.device(device)} or quantized or torch.device("meta") in devices:
        yield
        return
    origin = devices.pop()
    model.to(device)
    try:
        yield
    finally:
        model.to(origin)


def autocast_in_effect(model: nn.Module) -> str | None:
    """``"bf16"``/``"fp16"`` where ``torch.autocast`` is on for ``model``'s device (its first parameter's); None."""
    parameter = next(model.parameters(), None)
    device = parameter.device.type if parameter is not None else "cpu"
    if not torch.is_autocast_enabled(device):
        return None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch.get_autocast_dtype(device), "other")


def _checksum(values: Tensor) -> str:
    return hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()


def write_cache(path: Path, key: dict, values: Tensor) -> None:
    """Write ``values`` ``[rows, 2]`` fp32 with ``key`` and a checksum in the Arrow schema's metadata, atomically."""
    import pyarrow as pa

    table = pa.table({"ref_chosen_logps": values[:, 0].numpy(), "ref_rejected_logps": values[:, 1].numpy()})
    meta = {"fastdpo_key": json.dumps(key, sort_keys=True), "fastdpo_checksum": _checksum(values)}
    table = table.replace_schema_metadata(meta)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with atomic_open(path, "wb") as handle:
        handle.write(sink.getvalue())
    _remove_stale_temporaries(path.parent)


STALE_SECONDS = 86400  # a temporary file this old is no write under way


def _remove_stale_temporaries(folder: Path) -> None:
    """The temporary files of writes killed mid-way (SIGKILL: never renamed, never read) a day old or more: they were
    left in the folder for good."""
    cutoff = time.time() - STALE_SECONDS
    for leftover in folder.glob(".*.arrow.*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def read_cache(path: Path, key: dict) -> tuple[Tensor | None, str]:
    """``(values, "")`` when the file at ``path`` is complete, has ``key`` and its checksum; else ``(None, why)``."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        chosen = torch.from_numpy(table.column("ref_chosen_logps").to_numpy().copy())
        rejected = torch.from_numpy(table.column("ref_rejected_logps").to_numpy().copy())
    except (pa.ArrowException, OSError, KeyError, UnicodeDecodeError) as error:
        return None, f"unreadable: {error.__class__.__name__}"
    if meta.get("fastdpo_key") != json.dumps(key, sort_keys=True):
        return None, "its key does not match"
    values = torch.stack([chosen, rejected], dim=1).float()
    if len(values) != key["num_rows"]:
        return None, f"{len(values)} rows for {key['num_rows']}"
    if meta.get("fastdpo_checksum") != _checksum(values):
        return None, "checksum mismatch"
    if not bool(torch.isfinite(values).all()):
        return None, "non-finite values"
    return values, ""
