"""A real pretrained model's shape as command-line options (shared by the profile benchmarks): by default
30 layers, 576 wide, 9 query and 3 key-value heads, MLP 1536, a 49,152-token vocabulary, tied embeddings,
and evaluation tokens of ``--batches`` x ``--batch-size`` x ``--seq-len``."""

from __future__ import annotations

import argparse

from gpas_probe.config import ModelConfig


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)


def shape_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_heads=a.heads,
                       num_kv_heads=a.kv_heads, num_layers=a.layers, max_seq_len=max(256, a.seq_len),
                       tie_embeddings=True)
