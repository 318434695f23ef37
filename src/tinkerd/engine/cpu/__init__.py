"""The float32 CPU fast path of decode steps.

`packing`: frozen projection weights prepacked for oneDNN (the matmuls of a step).
`kernels`: C kernels for what lies between those matmuls (rotary + cache write +
attention, residual add + RMSNorm) and for grouped LoRA, compiled from `kernels.c` on
first use. Both are optional: without them the model computes the same with torch ops.
"""
