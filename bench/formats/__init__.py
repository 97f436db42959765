"""Quality of imported published formats (GGUF, GPTQ, NVFP4): KL of each import against its BF16 source."""
