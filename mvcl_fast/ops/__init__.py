"""The four ops as torch custom ops (fake impls + registered autograd), one file per op."""
