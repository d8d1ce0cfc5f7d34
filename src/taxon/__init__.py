"""taxon: which training recipe lets a small language model reach a large model's score."""

__version__ = "0.1.0"
