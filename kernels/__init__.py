"""Attention kernels: each op folder pairs plain-PyTorch references with its fast paths."""
