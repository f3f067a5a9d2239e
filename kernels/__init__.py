"""fastmae's Triton kernels and their launchers (installed as `fastmae.kernels`; no model code here).

One file per op: `attention.py`, `tokens.py` (patch gather, token gather, decoder unshuffle), `loss.py`
(masked MSE), each holding the `@triton.jit` kernels, plain launcher functions, and an autograd
Function; `compile_check.py` compiles every launchable configuration for real GPU targets.
"""
