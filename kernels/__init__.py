"""Triton kernels; leaves that import nothing from fastlora."""
