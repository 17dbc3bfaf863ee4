"""Compression methods by name. Each is `run(job) -> Outcome` (see methods/base.py)."""
from vtrans.methods import baselines, optin, vtrans

METHODS = {
    "vtrans": vtrans.run,
    "fast-vtrans": vtrans.run,
    "faster-vtrans": vtrans.run_faster,
    "optin": optin.run,
    "random": baselines.run_random,
}
