"""Exporters: each consumes the same stream of `TensorJob`s and writes one format."""
