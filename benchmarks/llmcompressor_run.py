"""Runs inside llm-compressor's own venv (tests/venvs.py llmcompressor): quantize a Hugging Face
Llama checkpoint the way its users do, W4A16 group G symmetric, into a compressed-tensors folder.

    python llmcompressor_run.py SRC OUT rtn|gptq GROUP TOKENS.json

TOKENS.json: the calibration sequences (lists of token ids), the very ones our GPTQ used, so the
two GPTQs see the same data. `rtn`: QuantizationModifier (min/max observer, no data); `gptq`:
GPTQModifier with its defaults (dampening 0.01, block 128, its default act-order setting).
"""

import json
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out, method, group, tokens_file = sys.argv[1:6]
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src)
scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "strategy": "group", "group_size": int(group)}}}
if method == "rtn":
    oneshot(model=model, recipe=QuantizationModifier(config_groups=scheme, ignore=["lm_head"]))
else:
    samples = json.load(open(tokens_file))
    data = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    oneshot(model=model, dataset=data, recipe=GPTQModifier(config_groups=scheme, ignore=["lm_head"]),
            num_calibration_samples=len(samples), max_seq_length=len(samples[0]), shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
