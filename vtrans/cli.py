"""The `vtrans` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtrans import distributed
from vtrans.api import MASK_OPTIONS, Options, compress
from vtrans.deploy.onnx import QUANTIZE
from vtrans.distributed import DEVICES, DTYPES
from vtrans.errors import UsageError
from vtrans.methods import METHODS
from vtrans.methods.vtrans import MASK_INITS
from vtrans.objectives import OBJECTIVES
from vtrans.training import DISTILL_LAYERS

DEFAULTS = Options()


def _run_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that compresses takes (compress, bench): where model and data come from and
    how each run trains."""
    parser.add_argument("model", nargs="?", help="Hugging Face name or local path (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--data", help="CSV/TSV/JSONL file with text[, text_pair], label columns, or a datasets "
                                       "name (default: bundled Rotten Tomatoes demo); for --objective lm or "
                                       "features, plain text: .txt, or rows with a text field; for --objective "
                                       "image, a directory of class subfolders (DIR/<label>/<image>) or a datasets "
                                       "name with image and label columns")
    parser.add_argument("--objective", default=DEFAULTS.objective, choices=list(OBJECTIVES),
                        help="classification: labelled text, accuracy; lm: plain text, next-token loss and "
                             "distillation, perplexity at --max-length tokens; features: plain text, no labels, "
                             "an encoder's representations distilled, cosine to the dense sentence embeddings; "
                             "image: labelled images, a ViT or DINOv2 classifier, accuracy (default: "
                             "classification)")
    parser.add_argument("--eval-data", help="held-out data (default: hold out part of --data, reproducibly)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--max-length", type=int, default=DEFAULTS.max_length,
                        help="tokens per example; FLOPs budgets are counted at this length")
    parser.add_argument("--image-size", type=int, default=DEFAULTS.image_size,
                        help="--objective image: pixels a side images are resized to; FLOPs count the patches of "
                             "this size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--holdout", type=float, default=DEFAULTS.holdout,
                        help="share of --data held out when no --eval-data is given")
    parser.add_argument("--teacher-epochs", type=float, default=DEFAULTS.teacher_epochs,
                        help="fine-tuning epochs when MODEL has no trained head for the labels")
    parser.add_argument("--teacher-lr", type=float, default=DEFAULTS.teacher_lr,
                        help=f"learning rate of that fine-tuning (default: {DEFAULTS.teacher_lr:g})")
    parser.add_argument("--prune-epochs", type=float, default=DEFAULTS.prune_epochs,
                        help="epochs of mask training (default: 1; 10 over the sample for fast/faster-vtrans)")
    parser.add_argument("--recover-epochs", type=float, default=DEFAULTS.recover_epochs,
                        help="epochs of distillation into the cut model, any method (default: as --prune-epochs "
                             "for vtrans and fast-vtrans; 0 for faster-vtrans and the one-shot methods)")
    parser.add_argument("--data-fraction", type=float, default=DEFAULTS.data_fraction,
                        help="share of the data fast-vtrans and faster-vtrans learn from (default: 0.03)")
    parser.add_argument("--recover-fraction", type=float, default=DEFAULTS.recover_fraction,
                        help="share of the data the recovery distils on (default: what the method learned from: "
                             "the sample for fast/faster-vtrans, in varied copies on text, all of it for the others); "
                             "1 gives every method the same recovery, on the data as it is")
    parser.add_argument("--augment", type=float, default=DEFAULTS.augment,
                        help="text classification: weights that recover on a sample (fast-vtrans's) train on "
                             "copies of it with this share of the tokens replaced by others of the batch, labelled "
                             "by the teacher: on the sample itself they overfit it; other data trains as it is "
                             "(default: 0.15; 0: the sample as it is)")
    parser.add_argument("--round-to", type=int, default=DEFAULTS.round_to,
                        help="keep FFN neurons per layer and hidden dims in multiples of this (e.g. 8 or 64: "
                             "matrix sizes kernels like), still within the budget (default: 1)")
    parser.add_argument("--quantize", choices=QUANTIZE,
                        help="also write DIR/onnx/: the compressed model in ONNX and its dynamic int8 copy, whose "
                             "metric, size and latency the report gives (needs vtrans[onnx])")
    parser.add_argument("--device", default=DEFAULTS.device, choices=DEVICES,
                        help="where models and batches run: auto (a GPU where PyTorch sees one, else the CPU), cpu "
                             "or cuda; under torchrun each process takes its LOCAL_RANK's GPU (default: auto)")
    parser.add_argument("--dtype", default=DEFAULTS.dtype, choices=list(DTYPES),
                        help="of the frozen models: the teacher, and the student while its weights do not train "
                             "(faster-vtrans, optin, fisher, magnitude, random without recovery); bfloat16 halves "
                             "their memory; the compressed model is judged and saved in it (default: float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="while the student's weights train (vtrans, fast-vtrans, recovery), recompute each "
                             "layer's activations in the backward pass instead of keeping them: less memory, "
                             "about a third more time")
    masks = parser.add_argument_group("mask training (vtrans, fast-vtrans, faster-vtrans)")
    masks.add_argument("--mask-init", default=DEFAULTS.mask_init, choices=MASK_INITS,
                       help="fisher: start each unit's log_alpha by its Fisher information per cost (a one-shot "
                            "choice, refined by training); uniform: all equal (default: fisher)")
    masks.add_argument("--mask-lr", type=float, default=DEFAULTS.mask_lr,
                       help="Adam learning rate of the masks (default: 4 / ramp steps, within [0.01, 0.1])")
    masks.add_argument("--ramp", type=float, default=DEFAULTS.ramp,
                       help="share of the mask search over which the target falls from the masks' starting "
                            "expected cost to the budget (default: 0.5)")
    masks.add_argument("--penalty", type=float, default=DEFAULTS.penalty,
                       help="initial weight of the squared gap between the masks' expected cost and the target: how "
                            "hard they are pushed to follow it (default: 1000)")
    masks.add_argument("--settle", type=float, default=DEFAULTS.settle,
                       help="share of pruning with the kept set fixed and deterministic masks (default: 0.25 "
                            "when the weights are frozen, else 0; skipped where --rescale replaces what it learns)")
    masks.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=DEFAULTS.rescale,
                       help="set the kept units' values by least squares at the end, each layer's to reproduce the "
                            "dense model's residual stream (default: when the weights are frozen, but not through "
                            "DINOv2's LayerScale; fisher always does)")
    masks.add_argument("--kl-weight", type=float, default=DEFAULTS.kl_weight,
                       help="weight per unit of the VIB KL (default: 1e-6)")
    masks.add_argument("--mask-temperature", type=float, default=DEFAULTS.mask_temperature,
                       help="T of the keep probability sigmoid(log_alpha / T) in the expected cost (default: 1)")
    masks.add_argument("--distill-layers", default=DEFAULTS.distill_layers, choices=DISTILL_LAYERS,
                       help="hidden states distilled from the teacher (default: all, but the last only in a "
                            "search the least-squares fit follows, as faster-vtrans's; none for --objective lm)")


RUN_OPTIONS = (
    "objective", "eval_data", "max_length", "image_size", "batch_size", "seed", "holdout", "teacher_epochs",
    "teacher_lr", "prune_epochs", "recover_epochs", "data_fraction", "recover_fraction", "augment", "round_to",
    "quantize", "device", "dtype", "gradient_checkpointing",
    *MASK_OPTIONS,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtrans", description="Make pre-trained transformers smaller and faster.")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compress", help="compress a model to a budget and save the smaller model",
                            description="With no MODEL and no --data: the bundled demo (all-MiniLM-L6-v2 on "
                                        "Rotten Tomatoes sentiment), a few minutes on 2 CPU cores.")
    _run_options(c)
    c.add_argument("--target", default="flops=0.4",
                   help="budget: flops=F (fraction of dense FLOPs at --max-length tokens) or params=P "
                        "(fraction, or a count like 30M) (default: flops=0.4)")
    c.add_argument("--method", default="vtrans", choices=sorted(METHODS))
    c.add_argument("--out", default="vtrans-out", help="output directory (default: vtrans-out)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    c.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every,
                   help="steps between checkpoints (default: 50; 0: none)")

    b = commands.add_parser("bench", help="every method at every target, side by side, with plots",
                            description="Runs each method at each target on the same split, seed and machine; "
                                        "writes DIR/bench.json, bench.md, PNG plots and every model.")
    _run_options(b)
    b.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated; METHOD+recover adds VTrans's default recovery after METHOD, e.g. "
                        f"fisher+recover (default: {','.join(METHODS)})")
    b.add_argument("--targets", default="flops=0.6,flops=0.4", help="comma-separated (default: flops=0.6,flops=0.4)")
    b.add_argument("--plot-method", help="the method whose kept heads/neurons per layer are drawn (default: first)")
    b.add_argument("--out", default="vtrans-bench", help="output directory (default: vtrans-bench)")

    p = commands.add_parser("probe", help="where each attention head looks; were the pruned heads different?",
                            description="Per head of the dense MODEL, over a sample of DATA: attention mass on "
                                        "special tokens, the current token, the previous token and the rest, and "
                                        "its entropy. With --compressed DIR: which heads were kept, and a test of "
                                        "whether pruned heads favour special/current tokens.")
    p.add_argument("model", nargs="?", help="the dense model (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", help="text data (default: bundled Rotten Tomatoes test sample)")
    p.add_argument("--compressed", help="a directory written by vtrans compress from MODEL")
    p.add_argument("--out", help="output directory (default: COMPRESSED/probe, or vtrans-probe)")
    p.add_argument("--samples", type=int, default=256, help="examples to probe (default: 256)")
    p.add_argument("--examples", type=int, default=4, help="sentences shown one by one (default: 4)")
    p.add_argument("--max-length", type=int, default=DEFAULTS.max_length)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")

    r = commands.add_parser("report", help="an HTML page (with PNGs) on a compressed model",
                            description="Writes DIR/report.html: budget, dense vs compressed, what was kept per "
                                        "layer, training curves, and the probe if DIR/probe exists.")
    r.add_argument("dir", help="a directory written by vtrans compress")
    r.add_argument("--debug", action="store_true", help="show Python tracebacks")

    e = commands.add_parser("export", help="export a compressed model to ONNX, optionally int8",
                            description="Writes ONNX_DIR/model.onnx (torch.onnx, batch and sequence dynamic) with the "
                                        "tokenizer, checks onnxruntime against PyTorch, and with --quantize int8 "
                                        "also model_int8.onnx (onnxruntime's dynamic quantization of the weights).")
    e.add_argument("dir", help="a directory written by vtrans compress")
    e.add_argument("--format", default="onnx", choices=["onnx"])
    e.add_argument("--out", required=True, help="the directory to write model.onnx (and model_int8.onnx) to")
    e.add_argument("--quantize", choices=QUANTIZE, help="also write a dynamically quantized model_int8.onnx")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.add_argument("--debug", action="store_true", help="show Python tracebacks")

    t = commands.add_parser("latency", help="measure forward latency, dense vs compressed side by side",
                            description="Times forward passes of MODEL (and each --compare model) on the same random "
                                        "batches, interleaved, over a grid of batch sizes and lengths: median and "
                                        "range in ms, speedup over MODEL. A model is a Hub name or checkpoint, a "
                                        "directory written by vtrans compress, or an ONNX file or export directory.")
    t.add_argument("model", help="the reference model (e.g. the dense one)")
    t.add_argument("--compare", action="append", default=[], help="another model to time beside it (repeatable)")
    t.add_argument("--batch-sizes", default="1,32", help="comma-separated (default: 1,32)")
    t.add_argument("--seq-lens", default="16,128", help="comma-separated tokens per sequence (default: 16,128)")
    t.add_argument("--repeats", type=int, default=10, help="timed passes per model and shape (default: 10)")
    t.add_argument("--warmup", type=int, default=2, help="untimed passes first (default: 2)")
    t.add_argument("--new-tokens", type=int, default=0,
                   help="time generating this many tokens after each prompt (decoders), not one forward pass")
    t.add_argument("--out", help="also write the rows to this JSON file")
    t.add_argument("--debug", action="store_true", help="show Python tracebacks")

    n = commands.add_parser("plan", help="parameters, FLOPs and each method's peak memory, from the config alone",
                            description="Reads MODEL's config only (no weights): parameters and FLOPs, dense and at "
                                        "the target, and the estimated peak memory of each method at the batch size "
                                        "and length given, so that you know what machine a run needs.")
    n.add_argument("model", nargs="?", help="Hugging Face name or local path (default: bundled all-MiniLM-L6-v2)")
    n.add_argument("--target", default="flops=0.4", help="flops=F or params=P (default: flops=0.4)")
    n.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    n.add_argument("--objective", default=DEFAULTS.objective, choices=list(OBJECTIVES))
    n.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    n.add_argument("--max-length", type=int, default=DEFAULTS.max_length)
    n.add_argument("--dtype", default=DEFAULTS.dtype, choices=list(DTYPES), help="of the frozen weights, as compress")
    n.add_argument("--gradient-checkpointing", action="store_true", help="as compress")
    n.add_argument("--processes", type=int, default=1, help="data-parallel processes sharing the batch (torchrun)")
    n.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(item) for item in split_list(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text}: give comma-separated positive integers, e.g. 1,32")
    return values


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {name: getattr(args, name) for name in RUN_OPTIONS if hasattr(args, name)}
    try:
        if args.command == "compress":
            from vtrans.report import summary

            result = compress(args.model, args.data, target=args.target, method=args.method, out=args.out,
                              overwrite=args.overwrite, resume=args.resume, checkpoint_every=args.checkpoint_every,
                              **options)
            if distributed.is_main():
                print(summary(result.report, result.out))
            distributed.stop()
        elif args.command == "bench":
            from vtrans.bench import bench, markdown

            rows = bench(args.model, args.data, split_list(args.methods), split_list(args.targets), args.out,
                         plot_method=args.plot_method, overwrite=args.overwrite, **options)
            print(markdown(rows))
            print(f"vtrans bench: table, rows and plots in {args.out}")
        elif args.command == "probe":
            from vtrans.probe import probe

            if args.samples < 1 or args.examples < 0:
                raise UsageError("--samples must be at least 1 and --examples 0 or more")
            probe(args.model, args.data, args.out, args.compressed, samples=args.samples, examples=args.examples,
                  max_length=args.max_length, seed=args.seed, overwrite=args.overwrite)
        elif args.command == "export":
            from vtrans.deploy.onnx import export

            record = export(args.dir, args.out, quantize=args.quantize, overwrite=args.overwrite)
            for kind, name in record["files"].items():
                print(f"vtrans export: {args.out}/{name}: {record['size_mb'][kind]} MB, largest difference to "
                      f"PyTorch {record['max_abs_difference'][kind]:.2e}")
        elif args.command == "latency":
            from vtrans.latency import compare, markdown
            from vtrans.surgery import write_text

            if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 0:
                raise UsageError("--repeats must be at least 1, --warmup and --new-tokens 0 or more")
            rows = compare([args.model, *args.compare], int_list(args.batch_sizes, "--batch-sizes"),
                           int_list(args.seq_lens, "--seq-lens"), repeats=args.repeats, warmup=args.warmup,
                           new_tokens=args.new_tokens)
            print(markdown(rows))
            if args.out:
                write_text(Path(args.out), json.dumps(rows, indent=2) + "\n")
        elif args.command == "plan":
            from vtrans.plan import Lean, markdown, plan
            from vtrans.teacher import default_model_path

            methods = split_list(args.methods)
            unknown = [m for m in methods if m not in METHODS]
            if unknown or not methods:
                raise UsageError(f"--methods {','.join(unknown) or args.methods}: choose from {', '.join(METHODS)}")
            if args.batch_size < 1 or args.max_length < 2 or args.processes < 1:
                raise UsageError("--batch-size and --processes must be at least 1 and --max-length at least 2")
            lean = Lean(frozen_bytes=DTYPES[args.dtype].itemsize, gradient_checkpointing=args.gradient_checkpointing,
                        processes=args.processes)
            print(markdown(plan(args.model or default_model_path(), args.target, methods, args.objective,
                                args.batch_size, args.max_length, lean)))
        elif args.command == "report":
            from vtrans.report import write_html

            print(f"vtrans report: {write_html(args.dir)}")
    except UsageError as e:
        if args.debug:
            raise
        print(f"vtrans: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
