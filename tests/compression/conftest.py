"""Fixtures shared by the compression tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def bert64(minilm_tokenizer):
    """Random BERT (hidden 64, 2 layers) with the real 30,522-token vocabulary."""
    import transformers as tr

    from slimformer.models import HFEncoderAdapter

    cfg = tr.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=30522, max_position_embeddings=72)
    torch.manual_seed(0)
    return HFEncoderAdapter(tr.BertModel(cfg).eval(), "tiny-bert64", minilm_tokenizer, "mean", 32)
