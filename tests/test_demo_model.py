"""The bundled demo model (the yardstick `nano`) is a genuine Hugging Face Apertus checkpoint."""

import mlx.core as mx
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import apertus_mlx
from apertus_mlx.load import DEMO_MODEL

from checkpoints import max_rel_error


def test_demo_model_matches_transformers():
    model, tokenizer = apertus_mlx.load(DEMO_MODEL)
    reference = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    text = "Die Hauptstadt der Schweiz ist Bern. Le paquet s'installe avec apt."
    ids = AutoTokenizer.from_pretrained(DEMO_MODEL)(text, return_tensors="np")["input_ids"]
    assert ids.tolist()[0] == tokenizer.encode(text)
    model.set_dtype(mx.float32)  # compare in float32: both read the same bf16 weights
    ours = np.array(model(mx.array(ids)))
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)).logits.numpy()
    assert max_rel_error(ours, ref) <= 1e-4
    assert tokenizer.eos_token_ids == {2, tokenizer.convert_tokens_to_ids("<|assistant_end|>")}
