"""rlpost: post-training for LLMs built around token-level credit assignment."""

__version__ = "0.1.0"
