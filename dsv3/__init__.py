"""dsv3: the DeepSeek-V3 training recipe as runnable software."""

__version__ = "0.1.0"
