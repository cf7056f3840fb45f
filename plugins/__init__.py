"""The two attention operators of ASTRO (MultiScaleSelfAttention, CandidateAttention):
``reference`` (plain PyTorch, the oracle), ``kernels`` (Triton), ``tensorrt`` (TensorRT
plugins over the kernels). Every implementation takes the reference's signature."""
