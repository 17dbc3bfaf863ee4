"""Training state saved every N steps, so that a killed run resumes where it stopped (`--resume`).

The state lives in one file beside the output directory (`.DIR.checkpoint/state.pt`), written atomically;
it is read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers,
so a planted pickle is never executed. A successful run deletes it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from vtrans import distributed
from vtrans.errors import UsageError
from vtrans.surgery import atomic_file


class Checkpoint:
    def __init__(self, directory: Path, every: int, run: dict):
        self.directory = Path(directory)
        self.every = every
        self.run = run  # what identifies the run: a checkpoint of another run is refused
        self.clock = (time.perf_counter(), 0.0)  # (when this process began, seconds spent before it)

    def start_clock(self, earlier: float = 0.0) -> None:
        """Count the run's seconds from now, after `earlier` seconds spent by the runs it resumes (to their last
        save); every save records the total, so a resumed run reports what the whole job cost."""
        self.clock = (time.perf_counter(), earlier)

    def elapsed(self) -> float:
        started, earlier = self.clock
        return earlier + time.perf_counter() - started

    @property
    def path(self) -> Path:
        return self.directory / "state.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def due(self, step: int) -> bool:
        return self.every > 0 and (step + 1) % self.every == 0

    def load(self) -> dict | None:
        if not self.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)  # loaded into place after
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise UsageError(f"checkpoint {self.path} cannot be read safely ({type(e).__name__}); "
                             "delete it, or pass --overwrite to start again") from None
        if state.get("run") != self.run:
            raise UsageError(f"checkpoint {self.path} belongs to another run (different model, data, method, "
                             "target or seed); pass --overwrite to start again")
        return state

    def save(self, state: dict) -> None:
        if not distributed.is_main():  # data-parallel ranks hold the same state: one writes it
            return
        with atomic_file(self.path) as partial:
            torch.save(state | {"run": self.run, "elapsed": self.elapsed()}, partial)

    def clear(self) -> None:
        if not distributed.is_main():
            return
        shutil.rmtree(self.directory, ignore_errors=True)


def capture(phase: str, step: int, objects: dict, **extra) -> dict:
    """The state of `objects` (anything with state_dict) and of every rank's global random generators after
    `step`. Called on every rank (the generators are gathered), saved by rank 0."""
    return {"phase": phase, "step": step, **_generator_states(),
            "objects": {name: obj.state_dict() for name, obj in objects.items()}, **extra}


def restore(state: dict, objects: dict) -> int:
    """Load `objects` and this rank's random generators from `state`; return the step to continue from."""
    for name, obj in objects.items():
        obj.load_state_dict(state["objects"][name])
    torch.set_rng_state(_own_row(state["rng"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_own_row(state["cuda_rng"]))
    return state["step"] + 1


def _generator_states() -> dict[str, torch.Tensor]:
    """Every rank's CPU (and, where CUDA is in use, GPU) generator state, one row per rank: ranks consume them
    unevenly where dropout runs over batch shares of different sizes."""
    states = {"rng": torch.stack(distributed.every_rank(torch.get_rng_state()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.stack(distributed.every_rank(torch.cuda.get_rng_state()))
    return states


def _own_row(states: torch.Tensor) -> torch.Tensor:
    """This rank's state; rank 0's where another number of processes saved them (or one state: older files)."""
    if states.dim() == 1:
        return states
    own = distributed.own_row(states)
    return own if own is not None else states[0].clone()
