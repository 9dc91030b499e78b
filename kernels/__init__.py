"""Triton kernels and their launchers, installed as `minimind_fast.kernels`.

Only kernels and plain launch functions live here: no autograd, no nn.Module, no dispatch.
Importing this package imports triton; the ops layer (minimind_fast/ops) imports it lazily.
"""
