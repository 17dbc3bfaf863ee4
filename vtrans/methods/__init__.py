"""Compression methods by name. Each is `run(job) -> Outcome` (see methods/base.py)."""
from vtrans.methods import vtrans

METHODS = {"vtrans": vtrans.run}
