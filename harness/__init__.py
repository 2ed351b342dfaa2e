"""wmbench: a robustness evaluation harness for deep-model watermarking and IP protection."""

__version__ = "0.1.0"
