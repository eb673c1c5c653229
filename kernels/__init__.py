"""SampleAttention kernels: Triton on CUDA, PyTorch reference elsewhere."""
