"""Triton kernels of facekernels: the fused margin-softmax heads (``heads.margin_cross_entropy``).

Nothing here is imported by ``import facekernels``; the backend table loads ``facekernels.triton.heads``
when backend="triton" (or "auto" on CUDA tensors) is first used.
"""
