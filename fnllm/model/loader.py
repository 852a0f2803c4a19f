"""Load a model from a Hugging Face directory or a GGUF file.

Everything is checked before the model is allocated: the config, every
file's header (present, complete, not truncated), the tensor names (none
missing, none unexpected, none in two shards) and their shapes. A malformed
checkpoint raises :class:`CheckpointError` (a ``ValueError``) naming the file
and the tensor or key. Then the model is allocated uninitialised and filled
tensor by tensor (``safe_open``), so no second full copy of the weights is
ever held. A sharded model (tensor / pipeline parallel) reads only its
rank's range of each tensor (``TensorRef.read_slice``: safetensors
``get_slice``, GGUF row or column ranges).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fnllm.model.model_config import CheckpointError, DecoderConfig, decoder_config_from_dict
from fnllm.model.pangu import MODEL_CLASSES, expected_tensors, ignorable_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where one checkpoint tensor lives and how to read it."""

    file: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    slice_reader: Callable[[int, int, int], torch.Tensor] | None = None

    def read_slice(self, dim: int, lo: int, hi: int) -> torch.Tensor:
        """Elements ``lo:hi`` along ``dim`` (0: rows, 1: columns), reading no more than the format needs."""
        if self.slice_reader is not None:
            return self.slice_reader(dim, lo, hi)
        return self.read().narrow(dim, lo, hi - lo)


@dataclass(frozen=True)
class Checkpoint:
    path: str
    config: DecoderConfig
    tensors: dict[str, TensorRef]
    gguf_path: str | None = None


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# -- safetensors headers -------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file; raises when the file is
    malformed or shorter than its header says (truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        if entry.get("dtype") not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has non-float dtype {entry.get('dtype')!r}")
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, data needs {8 + n + end})")
    return header


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _MappedFile:
    """One safetensors file mapped once (private, copy-on-write pages): a
    tensor read is a view of the page cache, so loading copies each weight
    once, into its parameter (``safe_open(...).get_tensor`` allocates and
    fills a second copy per tensor, then opens the file again for the next)."""

    def __init__(self, path: Path):
        self.path = path
        self._data: torch.Tensor | None = None

    def tensor(self, entry: dict) -> torch.Tensor:
        if self._data is None:
            import mmap

            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                # read-only, its pages mapped up front (one call instead of a fault per page)
                buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ)
            with warnings.catch_warnings():  # torch warns that the buffer is not writable: it is never written
                warnings.simplefilter("ignore", UserWarning)
                self._data = torch.frombuffer(buf, dtype=torch.uint8)[8 + n:]
        lo, hi = entry["data_offsets"]
        return self._data[lo:hi].view(_SAFETENSORS_DTYPES[entry["dtype"]]).view(tuple(entry["shape"]))


def _reader(mapped: _MappedFile, entry: dict) -> Callable[[], torch.Tensor]:
    return lambda: mapped.tensor(entry)


def _slice_reader(path: Path, name: str) -> Callable[[int, int, int], torch.Tensor]:
    def read(dim: int, lo: int, hi: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            part = f.get_slice(name)
            return part[lo:hi] if dim == 0 else part[:, lo:hi]

    return read


def _shard_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from None
        files = sorted({root / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard file {f.name} is missing")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no model.safetensors, {INDEX_NAME} or *.safetensors file")
    return files


def _hf_tensors(root: Path) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for path in _shard_files(root):
        mapped = _MappedFile(path)
        for name, entry in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards: {tensors[name].file} and {path}")
            tensors[name] = TensorRef(str(path), tuple(entry["shape"]), _reader(mapped, entry), _slice_reader(path, name))
    index = root / INDEX_NAME
    if index.is_file():
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or Path(tensors[name].file).name != file:
                raise CheckpointError(f"{index}: tensor {name!r} is not in its shard {file}")
    return tensors


def load_hf_config(root: Path) -> DecoderConfig:
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: config.json is missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: malformed JSON ({e})") from None
    cfg = decoder_config_from_dict(raw, str(cfg_path))
    return _with_generation_eos(root, cfg)


def _with_generation_eos(root: Path, cfg: DecoderConfig) -> DecoderConfig:
    """Add the stop ids of ``generation_config.json`` (chat models list their
    end-of-turn id there) to the config's eos ids."""
    gen = root / "generation_config.json"
    if not gen.is_file():
        return cfg
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{gen}: malformed JSON") from None
    extra = (eos,) if isinstance(eos, int) else tuple(eos or ())
    if not all(isinstance(t, int) and 0 <= t < cfg.vocab_size for t in extra):
        raise CheckpointError(f"{gen}: key 'eos_token_id' holds ids outside the vocabulary: {eos!r}")
    merged = cfg.eos_token_ids + tuple(t for t in extra if t not in cfg.eos_token_ids)
    return dataclasses.replace(cfg, eos_token_ids=merged)


# -- the checkpoint ----------------------------------------------------------------


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint's config and tensor index (no weights)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(f"{p}: a model file must be a .gguf (or give a Hugging Face directory)")
        from fnllm.model.gguf_cache import converted_dir
        from fnllm.model.gguf_loader import open_gguf

        copy = converted_dir(p)  # the same tensors, without parsing the GGUF again
        if copy is not None:
            ckpt = Checkpoint(str(copy), load_hf_config(copy), _hf_tensors(copy), gguf_path=str(p))
        else:
            ckpt = open_gguf(p)
    else:
        ckpt = Checkpoint(str(p), load_hf_config(p), _hf_tensors(p))
    validate(ckpt)
    return ckpt


def load_config(path: str | os.PathLike) -> DecoderConfig:
    """The model's architecture config (validates the whole checkpoint index)."""
    return open_checkpoint(path).config


def validate(ckpt: Checkpoint) -> None:
    expected = expected_tensors(ckpt.config)
    for name, ref in ckpt.tensors.items():
        if name in expected:
            if ref.shape != expected[name]:
                raise CheckpointError(
                    f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, expected {list(expected[name])}"
                )
        elif not ignorable_tensor(ckpt.config, name):
            raise CheckpointError(f"{ref.file}: unexpected tensor {name!r}")
    for name in expected:
        if name not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.path}: missing tensor {name!r}")


def load_model(path_or_ckpt, dtype="float32", device="cpu", shard=None, groups=None, place=None):
    """Validate, allocate, fill: returns ``(model, checkpoint)``. With a
    :class:`~fnllm.model.parallel.ShardSpec`, only that rank's part. ``place``,
    if given, is called with the allocated model before the checkpoint fills
    it (it may move the tensors: where they are first written, they stay)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, Checkpoint) else open_checkpoint(path_or_ckpt)
    cls = MODEL_CLASSES[ckpt.config.architecture]
    model = cls(ckpt.config, dtype=torch_dtype(dtype), device=device, shard=shard, groups=groups)
    if place is not None:
        place(model)
    expected = expected_tensors(ckpt.config)
    for name, ref in ckpt.tensors.items():
        if name in expected:
            model.load_ref(name, ref)
    return model.eval(), ckpt
