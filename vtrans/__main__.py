"""`python -m vtrans ...`, the form launchers take: `torchrun --nproc-per-node N -m vtrans compress ...`."""
import os
import sys

if os.environ.get("RANK", "0") != "0":  # a data-parallel rank other than 0: one set of progress bars is enough
    os.environ.setdefault("TQDM_DISABLE", "1")

from vtrans.cli import main  # noqa: E402 - after the progress bars are set

sys.exit(main())
