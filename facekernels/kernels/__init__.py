"""The kernels: the back-ends of the head algorithm (facekernels/_algorithm.py), ``cpu`` (the compiled C++ ops)
and ``triton`` (Triton kernels plus cuBLAS GEMMs), and the fused triplet loss (``triplet``: the compiled C++ and
CUDA triplet ops, backends "cpu" and "cuda"). Each is imported only when first asked for."""
