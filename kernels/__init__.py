"""fastmae's Triton kernels and their launchers (installed as `fastmae.kernels`; no model code here).

One file per op: `attention.py`, `tokens.py` (patch gather, token gather, decoder unshuffle), `loss.py`
(masked MSE), each holding the `@triton.jit` kernels, plain launcher functions, the launchers as
`torch.library` custom ops with fake implementations (so `torch.compile` treats each as one op; eager calls
run the implementation directly, see `utils.custom_op`), and the autograd formulas; `compile_check.py`
compiles every launchable configuration for real GPU targets; `launch.py` launches them with Triton's argument
binding done once per specialisation; `probe.py` holds two do-nothing kernels with which `fastmae bench ops` times
what one launch costs the host.
"""
