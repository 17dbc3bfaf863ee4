"""vtrans: make pre-trained transformers physically smaller and faster under a budget."""
from vtrans.api import compress
from vtrans.surgery import load
from vtrans.teacher import load_tokenizer

__all__ = ["compress", "load", "load_tokenizer"]
