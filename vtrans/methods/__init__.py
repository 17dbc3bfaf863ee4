"""Compression methods by name. Each is `run(job) -> Outcome` (see methods/base.py)."""
from vtrans.methods import baselines, optin, vtrans

METHODS = {
    "vtrans": vtrans.run,
    "fast-vtrans": vtrans.run_fast,
    "faster-vtrans": vtrans.run_faster,
    "optin": optin.run,
    "random": baselines.run_random,
    "magnitude": baselines.run_magnitude,
    "fisher": baselines.run_fisher,
}
KEEPS_HIDDEN = {"optin", "random", "magnitude", "fisher"}  # methods that prune heads and neurons only
