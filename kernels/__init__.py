"""Fused Triton kernels, installed as ``mvcl_fast.kernels`` (one file per op).

Importing a module here imports Triton; mvcl_fast only does so on the kernel
path (see mvcl_fast.backend).
"""
