"""Fixtures shared by the export tests: a random BERT adapter (hidden 64) and a tiny BERT model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimformer.models import HFEncoderAdapter


@pytest.fixture(scope="module")
def bert64(minilm_tokenizer) -> HFEncoderAdapter:
    """Random BERT, hidden 64 (groups of 32 fit), 2 layers, 4 heads; biases and norms randomised so no
    two tensors share content by accident."""
    import transformers as tr

    cfg = tr.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=30522, max_position_embeddings=72)
    torch.manual_seed(0)
    model = tr.BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return HFEncoderAdapter(model, "tiny-bert64", minilm_tokenizer, "mean", 32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    """The conftest tiny BERT (hidden 32, 4 heads, FFN 64, MiniLM tokenizer) saved as a model directory, with
    128 positions: a loaded directory encodes up to 128 tokens (make_tiny's adapter caps at 32)."""
    import transformers as tr

    cfg = tr.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=30522, max_position_embeddings=128)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    tr.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d)
    minilm_tokenizer.save_pretrained(d)
    return d
