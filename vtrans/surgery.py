"""Masks -> a physically smaller dense model; saving it atomically and loading it back in one call.

A compressed model is saved as an ordinary Hugging Face checkpoint (safetensors, config, tokenizer) whose
config keeps the dense architecture plus a `vtrans` entry recording each layer's kept sizes. `load` builds
the dense architecture, cuts it to those sizes with the family adapter, then reads the weights.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights

from vtrans.arch import Adapter, Dims, Kept, adapter_class_for
from vtrans.deploy import remote_code
from vtrans.deploy.modeling_vtrans import Resized
from vtrans.errors import UsageError


def indicators(kept: Kept, dims: Dims) -> dict[str, torch.Tensor]:
    """0/1 tensors (shaped like the masks) of the units `kept` keeps."""
    out = {name: torch.zeros(shape) for name, shape in dims.mask_shapes().items()}
    out["hidden"][kept.hidden] = 1
    for i in range(dims.layers):
        out["heads"][i, kept.heads[i]] = 1
        out["ffn"][i, kept.ffn[i]] = 1
    out["attention"][:] = torch.tensor(kept.attention, dtype=torch.float)
    out["ffn_block"][:] = torch.tensor(kept.ffn_block, dtype=torch.float)
    return out


def masked_values(kept: Kept, dims: Dims, scale: dict[str, torch.Tensor] | None = None):
    """The mask values (batch axis of 1) and hidden keep set that make a masked model equal the cut one."""
    keep = indicators(kept, dims)
    z = {name: (keep[name] * (scale[name] if scale is not None else 1)).unsqueeze(0) for name in keep}
    return z, keep["hidden"]


def cut_model(adapter: Adapter, kept: Kept, scale: dict[str, torch.Tensor] | None = None) -> None:
    """Fold `scale` (e.g. the VIB mu) of the kept units into the weights, then cut the rest away (in place).

    Folding the 0/1 keep values too matters: a dropped block's output bias must become zero.
    """
    z, _ = masked_values(kept, adapter.dims(), scale)
    device = next(adapter.model.parameters()).device  # mask values are on the CPU
    adapter.fold({name: v.squeeze(0).to(device) for name, v in z.items()})
    adapter.cut(kept)
    adapter.model.config.vtrans = {"family": adapter.family, "parts": adapter.parts_record(), "kept": kept.sizes()}


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False):
    """Yield a temporary sibling to write into; it becomes `out_dir` only when the block succeeds, its files
    flushed to the disk first (`_flush_to_disk`).

    A failure removes the temporary directory and leaves any previous `out_dir` untouched.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for written in tmp.rglob("*"):
            if written.is_file() and not written.is_symlink():
                _flush_to_disk(written)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if old.exists():
                old.rename(out_dir)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path` to write one file to; it becomes `path` only when the block succeeds,
    so a reader (a later run reading a cache) never sees half a file from a writer that was killed. Each writer
    has its own temporary file: two runs may write the same cache entry at once. The writer creates the file,
    so it gets the permissions any file the user writes gets (tempfile.mkstemp's would be private); a file
    replaced keeps its mode. A link is written through; a path that is no regular file (/dev/stdout) is
    written directly."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        yield partial
        _flush_to_disk(partial)
        if path.exists():
            shutil.copymode(path, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _flush_to_disk(path: Path) -> None:
    """`path`'s data on the disk before a name moves to it: a rename may reach the disk before the data written
    just before it, and a crash in between would leave the name on an empty file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_cache(path: Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` a cache entry through `atomic_file`. An entry that cannot be written (read-only cache,
    full disk) is skipped: it costs the next run a recomputation, not this run its result."""
    try:
        with atomic_file(path) as partial:
            write(partial)
    except OSError:
        pass


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically (`atomic_file`)."""
    with atomic_file(path) as partial:
        partial.write_text(text, encoding="utf-8")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; name a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UsageError(f"--out {out_dir} exists and is not empty; pass --overwrite or name another directory")


def save(model, tokenizer, out_dir: Path, json_files: dict[str, dict] | None = None,
         text_files: dict[str, str] | None = None, copied: dict[str, Path] | None = None,
         overwrite: bool = False) -> Path:
    """Write model (safetensors), tokenizer, JSON and text files, and copies of `copied` files (name: source), to
    `out_dir`, all or nothing. A compressed model also gets the code that loads it without vtrans
    (vtrans/deploy/remote_code.py)."""
    with atomic_directory(out_dir, overwrite) as tmp:
        with _no_transformers_bars():
            model.save_pretrained(tmp)
        if getattr(model.config, "vtrans", None) is not None:
            remote_code.write(tmp, model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name, text in (text_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        for name, source in (copied or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, tmp / name)
    return Path(out_dir)


@contextlib.contextmanager
def _no_transformers_bars():
    """No "Loading weights" / "Writing model shards" bars of transformers' own: a run shows its own progress."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


def load(path: str | os.PathLike):
    """A compressed model saved by vtrans, ready to use (eval mode), in one call.

    The dense architecture comes from config.json and the weights from safetensors through transformers'
    `from_pretrained` (which knows each family's checkpoint layout), resized in between by the same code a
    `trust_remote_code` load runs; the directory's own copy of that code is never executed."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise UsageError(f"{path} is not a vtrans model directory (no config.json)")
    if not any(path.glob("model*.safetensors")):
        raise UsageError(f"{path} holds no model.safetensors; point at a directory written by vtrans")
    config = remote_code.dense_config(path)
    model_class = getattr(transformers, config.architectures[0])
    record = getattr(config, "vtrans", None)
    if record is not None:
        if "parts" not in record:  # a directory written before parts were recorded: the family says where they are
            with init_empty_weights():
                record["parts"] = adapter_class_for(config.model_type)(model_class(config)).parts_record()
        model_class = type(model_class.__name__, (Resized, model_class), {})
    with _no_transformers_bars():
        model, info = model_class.from_pretrained(path, config=config, use_safetensors=True,
                                                  output_loading_info=True)
    wrong = {kind: sorted(keys)[:3] for kind, keys in info.items() if kind != "error_msgs" and keys}
    if wrong:
        raise UsageError(f"{path} does not match its config ({wrong}); was it written by this version of vtrans?")
    return model.eval()
