"""Yardstick: reproducible pipeline from Debian-package text to small trained Apertus models."""
