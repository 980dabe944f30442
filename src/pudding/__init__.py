"""pudding: prompt-routed depth pruning of large language models (PuDDing, ICML 2025)."""

__version__ = "0.1.0"
