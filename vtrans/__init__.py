"""vtrans: make pre-trained transformers physically smaller and faster under a budget."""
from vtrans.surgery import load

__all__ = ["load"]
