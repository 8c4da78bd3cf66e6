"""Fused Triton kernels of the adjoined convolution: forward, dgrad, wgrad, tuning.

``BACKEND`` is the "triton" backend of anfast.ops.adjoined_conv2d. Importing this
package needs triton but no GPU; kernels run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (set before triton is imported) when backend="triton" is asked for.
"""

from anfast.triton.backend import TritonBackend
from anfast.triton.dgrad import adjoined_conv2d_dgrad
from anfast.triton.forward import adjoined_conv2d_forward
from anfast.triton.wgrad import adjoined_conv2d_wgrad

__all__ = ["BACKEND", "TritonBackend", "adjoined_conv2d_forward", "adjoined_conv2d_dgrad",
           "adjoined_conv2d_wgrad"]

BACKEND = TritonBackend()
