"""vtrans: make pre-trained transformers physically smaller and faster under a budget."""
from vtrans.api import compress
from vtrans.surgery import load

__all__ = ["compress", "load"]
