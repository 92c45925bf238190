"""Shared test set-up.

Eight fake CPU devices are configured before jax is imported anywhere, so the
data-parallel equivalence tests (1 device vs 8) can run in the same session.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RUBRAX_JAX_CACHE", "0")  # CLI entry points called in tests compile afresh
