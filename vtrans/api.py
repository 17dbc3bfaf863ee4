"""The public face: `compress()` turns a model, data and a budget into a smaller model in a directory."""
from __future__ import annotations

import copy
import random
import statistics
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights

from vtrans import distributed
from vtrans.arch import Kept, adapter_for
from vtrans.budget import TOLERANCE, check_reachable, dense_cost, exact_cost, parse_target
from vtrans.checkpoint import Checkpoint
from vtrans.data import DEFAULT_HOLDOUT, DEMO_TEST, DEMO_TRAIN, demo_path
from vtrans.deploy.onnx import OnnxModel, check_available, output_name, size_mb, write_onnx
from vtrans.errors import UsageError
from vtrans.latency import fit_latency, measure, onnx_runner, torch_runner
from vtrans.methods import METHODS, hidden_width_hint, run
from vtrans.methods.base import Job
from vtrans.methods.vtrans import MASK_INITS, VTransSettings
from vtrans.objectives import OBJECTIVES, Objective, objective_for
from vtrans.report import build_report, model_card
from vtrans.surgery import check_output_dir, load, save
from vtrans.teacher import DEFAULT_MODEL_NAME, cache_root, default_model_path, load_config
from vtrans.training import DISTILL_LAYERS, DistillWeights


@dataclass
class Options:
    """Everything `compress` can be told besides model, data, target, method and out."""

    objective: str = "classification"  # or "lm", "features", "image" (objectives/__init__.py)
    eval_data: str | None = None
    max_length: int = 128  # tokens per example (text); FLOPs budgets are counted at this length
    image_size: int | None = None  # pixels a side (images); None: the model's; FLOPs count its patches
    batch_size: int = 32
    seed: int = 0
    overwrite: bool = False
    holdout: float = DEFAULT_HOLDOUT  # share of DATA held out for evaluation when no eval_data is given
    teacher_epochs: float = 1.0
    teacher_lr: float = 5e-5
    prune_epochs: float | None = None  # None: the method's default (1 epoch; 10 over a sample)
    # distillation into the cut model, the same for every method; None: as prune_epochs for vtrans and
    # fast-vtrans, none for faster-vtrans and the one-shot methods
    recover_epochs: float | None = None
    data_fraction: float = 0.03  # fast-vtrans and faster-vtrans learn from this label-stratified share
    recover_fraction: float | None = None  # share of the data recovery distils on; None: what the method learned from
    augment: float = 0.15  # share of tokens replaced in the varied copies of a sample that weights recover on
    # mask training (vtrans, fast-vtrans, faster-vtrans); see methods/vtrans.py
    mask_init: str = "fisher"  # log_alpha spread by Fisher information per cost, or "uniform"
    mask_lr: float | None = None  # None: 4 / ramp steps, within [0.01, 0.1]
    ramp: float = 0.5  # share of the mask search over which the target falls from the masks' start to the budget
    penalty: float = 1000.0  # initial lambda2 of the Lagrangian, on the squared gap between expected cost and target
    settle: float | None = None  # share of pruning with the kept set fixed; None: see VTransSettings
    rescale: bool | None = None  # least squares on the kept units' values at the end; None: see VTransSettings
    kl_weight: float = 1e-6  # per unit, on the VIB KL summed over units
    mask_temperature: float = 1.0  # of the keep probability sigmoid(log_alpha / T) in the expected cost
    distill_layers: str | None = None  # hidden states distilled: all, last, none; None: the objective's choice
    latency_batch: int = 32
    latency_seq_len: int = 64
    round_to: int = 1  # kept FFN neurons per layer and hidden width in multiples of this
    quantize: str | None = None  # "int8": also an ONNX int8 copy (DIR/onnx/), judged in the report
    resume: bool = False  # continue an interrupted run from its checkpoint
    checkpoint_every: int = 50  # steps between checkpoints (0: none)
    device: str = "auto"  # "cpu", "cuda" or "auto" (this rank's GPU where there is one); see distributed.py
    # of the frozen models (the teacher; the student while its weights do not train); "float32" or "bfloat16"
    dtype: str = "float32"
    # recompute each layer's activations in the backward pass instead of keeping them, while weights train
    gradient_checkpointing: bool = False


@dataclass
class Result:
    model: torch.nn.Module
    report: dict
    out: Path


def validate_options(opts: Options) -> None:
    checks = [
        ("--objective", opts.objective, opts.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
        ("--max-length", opts.max_length, opts.max_length >= 2, "at least 2"),
        ("--image-size", opts.image_size, opts.image_size is None or opts.image_size >= 1, "at least 1"),
        ("--batch-size", opts.batch_size, opts.batch_size >= 1, "at least 1"),
        ("--holdout", opts.holdout, 0 < opts.holdout < 1, "between 0 and 1"),
        ("--data-fraction", opts.data_fraction, 0 < opts.data_fraction <= 1, "in (0, 1]"),
        ("--recover-fraction", opts.recover_fraction, opts.recover_fraction is None or 0 < opts.recover_fraction <= 1,
         "in (0, 1]"),
        ("--augment", opts.augment, 0 <= opts.augment < 1, "in [0, 1)"),
        ("--teacher-epochs", opts.teacher_epochs, opts.teacher_epochs > 0, "greater than 0"),
        ("--teacher-lr", opts.teacher_lr, opts.teacher_lr > 0, "greater than 0"),
        ("--prune-epochs", opts.prune_epochs, opts.prune_epochs is None or opts.prune_epochs > 0, "greater than 0"),
        ("--recover-epochs", opts.recover_epochs, opts.recover_epochs is None or opts.recover_epochs >= 0,
         "0 or more"),
        ("--mask-init", opts.mask_init, opts.mask_init in MASK_INITS, f"one of {', '.join(MASK_INITS)}"),
        ("--mask-lr", opts.mask_lr, opts.mask_lr is None or opts.mask_lr > 0, "greater than 0"),
        ("--ramp", opts.ramp, 0 < opts.ramp <= 1, "in (0, 1]"),
        ("--penalty", opts.penalty, opts.penalty >= 0, "0 or more"),
        ("--settle", opts.settle, opts.settle is None or 0 <= opts.settle < 1, "in [0, 1)"),
        ("--kl-weight", opts.kl_weight, opts.kl_weight >= 0, "0 or more"),
        ("--mask-temperature", opts.mask_temperature, opts.mask_temperature > 0, "greater than 0"),
        ("--distill-layers", opts.distill_layers, opts.distill_layers in (None, *DISTILL_LAYERS),
         f"one of {', '.join(DISTILL_LAYERS)}"),
        ("--checkpoint-every", opts.checkpoint_every, opts.checkpoint_every >= 0, "0 or more"),
        ("--round-to", opts.round_to, isinstance(opts.round_to, int) and opts.round_to >= 1, "an integer, at least 1"),
        ("--dtype", opts.dtype, opts.dtype in distributed.DTYPES, f"one of {', '.join(distributed.DTYPES)}"),
    ]
    for flag, value, ok, wanted in checks:
        if not ok:
            raise UsageError(f"{flag} {value} must be {wanted}")


MASK_OPTIONS = ("mask_init", "mask_lr", "ramp", "penalty", "settle", "rescale", "kl_weight", "mask_temperature",
                "distill_layers")


def mask_settings(opts: Options, objective: Objective) -> VTransSettings:
    layers = opts.distill_layers or objective.distill_layers
    return VTransSettings(
        mask_init=opts.mask_init,
        mask_lr=opts.mask_lr,
        ramp=opts.ramp,
        penalty=opts.penalty,
        settle=opts.settle,
        rescale=opts.rescale,
        kl_weight=opts.kl_weight,
        temperature=opts.mask_temperature,
        distill=DistillWeights(layers=layers),
        search_layers=opts.distill_layers,  # given: the search matches those too
    )


def _silent(*_) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compress(model: str | None = None, data: str | None = None, target: str = "flops=0.4",
             method: str = "vtrans", out: str | Path = "vtrans-out", say=print, **options) -> Result:
    """Compress MODEL on DATA to the budget `target` with `method`; write the model and report.json to `out`.

    With neither model nor data, the shipped demo: all-MiniLM-L6-v2 on Rotten Tomatoes sentiment.
    Options are the fields of `Options` (e.g. eval_data=, max_length=, seed=, prune_epochs=).
    """
    unknown = set(options) - {f.name for f in fields(Options)}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opts = Options(**options)

    # Everything a user can get wrong is checked before any training starts.
    if method not in METHODS:
        raise UsageError(f"--method {method} is unknown; choose one of: {', '.join(METHODS)}")
    validate_options(opts)
    if opts.quantize is not None:
        check_available(opts.quantize)
    device = distributed.resolve_device(opts.device)
    if opts.quantize is not None and (device.type != "cpu" or opts.dtype != "float32"):
        raise UsageError(f"--quantize exports and times the int8 model on the CPU, from float32: drop it here and run "
                         f"`vtrans export DIR --quantize {opts.quantize}` after this run")
    opts.device = str(device)  # what the teacher's fine-tuning runs on
    distributed.start(device)
    if not distributed.is_main():  # data-parallel ranks run the same steps: rank 0 speaks and writes
        say = _silent
    budget = replace(parse_target(target, opts.max_length), multiple=opts.round_to)
    out = Path(out)
    check_output_dir(out, opts.overwrite)
    objective = objective_for(opts.objective)
    if opts.quantize is not None and not objective.exports_onnx:
        raise UsageError(f"--quantize: the ONNX export takes token inputs; drop --quantize for --objective "
                         f"{objective.name}")
    if data is None and objective.name != "classification":
        raise UsageError(f"--objective {objective.name} needs --data: {objective.data_wanted}")
    identity = {"model": model or DEFAULT_MODEL_NAME, "data": data, "target": target, "method": method} | {
        name: getattr(opts, name) for name in ("objective", "eval_data", "max_length", "image_size", "batch_size",
                                               "seed", "holdout", "prune_epochs", "recover_epochs", "data_fraction",
                                               "recover_fraction", "augment", "round_to", *MASK_OPTIONS)}
    checkpoint = Checkpoint(out.parent / f".{out.name}.checkpoint", opts.checkpoint_every, identity)
    if checkpoint.exists() and not (opts.resume or opts.overwrite):
        raise UsageError(f"an interrupted run left a checkpoint in {checkpoint.directory}: pass --resume to "
                         "continue it, or --overwrite to start again")
    if opts.resume:
        if checkpoint.load() is None:  # also refuses another run's (or an unsafe) checkpoint, now
            say(f"vtrans: --resume: no checkpoint in {checkpoint.directory}; starting from the beginning")
    else:
        checkpoint.clear()
    model_label = model or DEFAULT_MODEL_NAME
    model_name = model or default_model_path()
    if data is None:
        data, opts.eval_data = demo_path(DEMO_TRAIN), opts.eval_data or demo_path(DEMO_TEST)
        say(f"vtrans: no data given: using the bundled Rotten Tomatoes demo ({DEMO_TRAIN}, {DEMO_TEST})")
    config = load_config(model_name)
    tokens, latency_tokens = objective.tokens(config, opts), objective.latency_tokens(config, opts)  # both checked
    # a latency budget is timed at the latency batch and length, so its costs are counted at that length
    budget = replace(budget, seq_len=latency_tokens if budget.kind == "latency" else tokens)
    keep_hidden = not (METHODS[method].prunes_hidden and objective.prunes_hidden)
    hint = hidden_width_hint(method, objective)
    if budget.kind != "latency":  # a latency budget is checked once this machine's latency model is measured
        with init_empty_weights():  # shapes only: is the budget reachable at all?
            check_reachable(
                adapter_for(objective.auto_class().from_config(config)),
                budget,
                keep_hidden,
                hint,
            )
    train = objective.read(data)
    if opts.eval_data:
        evaluation = objective.read(opts.eval_data, split="validation")
    else:
        train, evaluation = objective.holdout(train, opts.holdout, opts.seed)
        say(f"vtrans: no --eval-data: holding out {opts.holdout:.0%} of {data} for evaluation "
            f"({len(evaluation)} of {len(train) + len(evaluation)} {objective.examples}, seed {opts.seed})")

    seed_everything(opts.seed)
    teacher = objective.load_teacher(model_name, train, evaluation, opts, say=say)
    teacher.model.requires_grad_(False)
    # the student starts as a float32 copy; it stays in --dtype only while its weights do not train
    trains_weights = METHODS[method].trains or bool(opts.recover_epochs)
    dtype = distributed.DTYPES[opts.dtype]
    student = copy.deepcopy(teacher.model).to(device, torch.float32 if trains_weights else dtype)
    if opts.gradient_checkpointing:
        if not student.supports_gradient_checkpointing:
            raise UsageError(f"--gradient-checkpointing: {type(student).__name__} does not support it; drop the "
                             "option")
        # transformers recomputes only in training mode, i.e. while the weights train (not faster-vtrans);
        # a decoder's key/value cache is off meanwhile (nothing generates here), then as it was
        student.activation_checkpointing_enable()
        use_cache = getattr(student.config, "use_cache", None)
        student.config.use_cache = False
    teacher.model.to(device, dtype)
    teacher_adapter = adapter_for(teacher.model)
    eval_loader = objective.encode(evaluation, teacher, opts.max_length).loader(
        objective.eval_batch_size or opts.batch_size,
        device=device,
    )

    latency_inputs = {name: value.to(device) for name, value in objective.random_inputs(teacher.model.config,
                                                                                         opts).items()}
    if budget.kind == "latency":
        latency_model = None
        if distributed.is_main():  # rank 0 times this machine; every rank takes its fit
            latency_model = fit_latency(
                teacher.model,
                latency_inputs,
                latency_tokens,
                cache=cache_root(),
                keep_hidden=keep_hidden,
            )
        budget = replace(budget, latency=distributed.from_main(latency_model))
        check_reachable(teacher_adapter, budget, keep_hidden, hint)
    dense = dense_cost(teacher_adapter, budget.seq_len)

    seed_everything(opts.seed)
    job = Job(
        method=method,
        model=student,
        adapter=adapter_for(student),
        teacher=teacher.model,
        budget=budget,
        train=objective.encode(train, teacher, opts.max_length),
        batch_size=opts.batch_size,
        seed=opts.seed,
        prune_epochs=opts.prune_epochs,
        recover_epochs=opts.recover_epochs,
        data_fraction=opts.data_fraction,
        augment=opts.augment,
        recover_fraction=opts.recover_fraction,
        checkpoint=checkpoint,
        resume=opts.resume,
        vtrans=mask_settings(opts, objective),
        objective=objective,
        device=device,
    )
    outcome = run(job)
    compression_seconds = sum(outcome.seconds.values())  # the method's wall time, teacher excluded
    if opts.gradient_checkpointing:
        outcome.model.activation_checkpointing_disable()
        outcome.model.config.use_cache = use_cache
    if not distributed.is_main():  # every rank holds the same model; rank 0 evaluates, times and writes it
        return Result(model=outcome.model.eval(), report={}, out=out)

    # dense and compressed are judged, timed and saved in the same dtype
    compressed = outcome.model.to(dtype).eval()
    dense_metric = objective.evaluate(teacher.model, eval_loader, teacher.model, "evaluating dense")
    compressed_cost = exact_cost(teacher_adapter, outcome.kept, budget.seq_len)
    compressed_metric = objective.evaluate(compressed, eval_loader, teacher.model, "evaluating compressed")
    runners = {"dense": torch_runner(teacher.model), "compressed": torch_runner(compressed)}
    with tempfile.TemporaryDirectory() as scratch:
        quantized, onnx_files = None, {}
        if opts.quantize:  # the compressed model in ONNX, quantized, judged as the compressed one is
            files = write_onnx(compressed, Path(scratch), opts.quantize)
            int8 = Path(scratch) / files[opts.quantize]
            quantized = {"format": "onnx", "file": f"onnx/{int8.name}", "size_mb": size_mb(int8.parent, int8.name),
                         "metric": objective.evaluate(OnnxModel(int8, output_name(compressed)), eval_loader,
                                                      teacher.model, f"evaluating {opts.quantize}")}
            runners[opts.quantize] = onnx_runner(int8)
            onnx_files = {f"onnx/{path.name}": path for path in Path(scratch).iterdir()}
        times = measure(runners, latency_inputs)
        latency = {name: statistics.median(t) for name, t in times.items()}
        report = build_report(
            method=method,
            objective=objective.name,
            model=model_label,
            data=data,
            eval_data=opts.eval_data or f"{opts.holdout:.0%} of data",
            budget=budget,
            dense_cost=dense,
            compressed_cost=compressed_cost,
            dense_metric=dense_metric,
            compressed_metric=compressed_metric,
            latency=latency,
            latency_shape=(opts.latency_batch, latency_tokens),
            kept=outcome.kept,
            dense_kept=Kept.dense(teacher_adapter.dims()),
            compression_seconds=compression_seconds,
            phase_seconds=outcome.seconds,
            teacher_cache=teacher.fine_tuned_at,
            seed=opts.seed,
            tolerance=TOLERANCE,
            log=outcome.log,
            query_group=teacher_adapter.dims().query_group,
            quantized=quantized,
        )
        save(compressed, teacher.processor, out, {"report.json": report, "training_log.json": outcome.log},
             {"README.md": model_card(report, objective.auto_class().__name__)} | objective.files_beside(model_name),
             copied=onnx_files, overwrite=opts.overwrite)
    checkpoint.clear()
    return Result(model=compressed, report=report, out=out)


__all__ = ["compress", "load", "Options", "Result"]
