"""Kernel back-ends of the head algorithm (facekernels/_algorithm.py): ``cpu`` (the compiled C++ ops) and
``triton`` (Triton kernels plus cuBLAS GEMMs). Each is imported only when a head first asks for it."""
