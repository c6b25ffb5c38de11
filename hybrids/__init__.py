"""hybrids: architecture-ablation experiments on hybrid state-space / attention language models."""

__version__ = "0.1.0"
