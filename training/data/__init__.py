"""Packing datasets into WebDataset shards and streaming them back."""
