"""Pools run batches of configs: one interface (base), one implementation per backend."""
