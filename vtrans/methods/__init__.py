"""Compression methods by name: how each chooses its kept set (see methods/base.py for the shared path)."""
from vtrans.methods import baselines, optin, vtrans
from vtrans.methods.base import Job, Method, Outcome, always_rescales
from vtrans.methods.base import run as _run

METHODS = {
    "vtrans": Method(vtrans.choose_trained, trains=True),
    "fast-vtrans": Method(  # Faster-VTrans's search, then its weights train on the sample (methods/vtrans.py)
        vtrans.choose_frozen,
        sampled=True,
        trains=True,
        prunes_hidden=False,
        rescales=vtrans.rescales_frozen,
    ),
    "faster-vtrans": Method(
        vtrans.choose_frozen,
        sampled=True,
        prunes_hidden=False,
        rescales=vtrans.rescales_frozen,
    ),
    "optin": Method(
        optin.choose,
        prunes_hidden=False,
        backprop=False,
        forward_sequences=optin.FORWARD_SEQUENCES,
    ),
    "random": Method(baselines.choose_random, prunes_hidden=False, backprop=False),
    "magnitude": Method(baselines.choose_magnitude, prunes_hidden=False, backprop=False),
    "fisher": Method(baselines.choose_fisher, prunes_hidden=False, rescales=always_rescales),
}


def hidden_width_hint(method: str, objective) -> str:
    """For a budget out of reach: the methods that prune the hidden width, when `method` is why it stays."""
    if METHODS[method].prunes_hidden or not objective.prunes_hidden:
        return ""
    pruners = " or ".join(name for name, other in METHODS.items() if other.prunes_hidden)
    return f", or use --method {pruners}: {method} keeps the hidden width"


def run(job: Job) -> Outcome:
    """Compress `job.model` with `job.method`: choose, cut, recover (if asked or the method trains)."""
    return _run(job, METHODS[job.method])
