"""Training your own model: data preparation, tokenizer training, PyTorch training and export.

Only `model`, `loader`, `trainer` and `export` import torch, and only when they are imported;
`options`, `stories`, `data` and `tokenizer` need numpy (and sentencepiece for tokenizers) alone.
"""
