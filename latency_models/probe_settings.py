"""Default settings of the probe, kept apart from the kernels so the CLI can show them cheaply."""

BACKEND = "numba-cn4"
TOOL_VERSION = "cn4 0.1.0"
DEFAULT_LEVELS = (0, 1, 2, 3)
DEFAULT_CONFIGS = 20
DEFAULT_REPEATS = 30
DEFAULT_WARMUP = 3
DEFAULT_SEED = 0

# Layer calls timed per repeat. Each is timed on its own, so that a call delayed by the
# scheduler is one outlier the median drops rather than part of every sample.
CALLS_PER_SAMPLE = 8
