"""The `vtrans` command."""
from __future__ import annotations

import argparse
import sys

from vtrans.api import Options, compress
from vtrans.errors import UsageError
from vtrans.methods import METHODS

DEFAULTS = Options()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtrans", description="Make pre-trained transformers smaller and faster.")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compress", help="compress a model to a budget and save the smaller model",
                            description="With no MODEL and no --data: the bundled demo (all-MiniLM-L6-v2 on "
                                        "Rotten Tomatoes sentiment), a few minutes on 2 CPU cores.")
    c.add_argument("model", nargs="?", help="Hugging Face name or local path (default: bundled all-MiniLM-L6-v2)")
    c.add_argument("--data", help="CSV/TSV/JSONL file with text[, text_pair], label columns, or a datasets name "
                                  "(default: bundled Rotten Tomatoes demo)")
    c.add_argument("--eval-data", help="held-out data (default: hold out part of --data, reproducibly)")
    c.add_argument("--target", default="flops=0.4",
                   help="budget: flops=F (fraction of dense FLOPs at --max-length tokens) or params=P "
                        "(fraction, or a count like 30M) (default: flops=0.4)")
    c.add_argument("--method", default="vtrans", choices=sorted(METHODS))
    c.add_argument("--out", default="vtrans-out", help="output directory (default: vtrans-out)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.add_argument("--debug", action="store_true", help="show Python tracebacks")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    c.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every,
                   help="steps between checkpoints (default: 50; 0: none)")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed)
    c.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="tokens per example")
    c.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    c.add_argument("--holdout", type=float, default=DEFAULTS.holdout,
                   help="share of --data held out when no --eval-data is given")
    c.add_argument("--teacher-epochs", type=float, default=DEFAULTS.teacher_epochs,
                   help="fine-tuning epochs when MODEL has no trained head for the labels")
    c.add_argument("--prune-epochs", type=float, default=DEFAULTS.prune_epochs,
                   help="epochs of mask training (default: 1; 10 over the sample for fast/faster-vtrans)")
    c.add_argument("--recover-epochs", type=float, default=DEFAULTS.recover_epochs,
                   help="epochs of distillation into the cut model (default: as --prune-epochs)")
    c.add_argument("--data-fraction", type=float, default=DEFAULTS.data_fraction,
                   help="share of the data fast-vtrans and faster-vtrans learn from (default: 0.03)")
    c.add_argument("--recover-steps", type=int, default=DEFAULTS.recover_steps,
                   help="faster-vtrans: distillation steps after the cut (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            from vtrans.report import summary

            result = compress(args.model, args.data, target=args.target, method=args.method, out=args.out,
                              eval_data=args.eval_data, max_length=args.max_length, batch_size=args.batch_size,
                              seed=args.seed, overwrite=args.overwrite, holdout=args.holdout,
                              teacher_epochs=args.teacher_epochs, prune_epochs=args.prune_epochs,
                              recover_epochs=args.recover_epochs, data_fraction=args.data_fraction,
                              recover_steps=args.recover_steps, resume=args.resume,
                              checkpoint_every=args.checkpoint_every)
            print(summary(result.report, result.out))
    except UsageError as e:
        if args.debug:
            raise
        print(f"vtrans: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
