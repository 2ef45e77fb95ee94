"""probe: read and change what pretrained language models compute (logit lens, FFN updates, attention)."""

__version__ = "0.1.0"
