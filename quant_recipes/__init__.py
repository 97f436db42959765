"""Quantization recipes for Apertus: declarative recipe files and the methods that carry them out."""
