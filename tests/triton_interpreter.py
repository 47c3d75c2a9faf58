"""Two corrections to Triton 3.7's interpreter (TRITON_INTERPRET=1), which runs our kernels on the CPU in the tests of
tests/test_fused_loss.py and tests/test_fused_mlp.py. It gets two things wrong that the GPU gets right:
  - a float narrowed to bfloat16 or float8 is rounded toward zero and the carry into the exponent is dropped
    (-7.875 to e4m3 gives -4.0), where the GPU rounds to nearest even, as torch does;
  - a bfloat16 tile product multiplies the integers that store the values.
correct() makes every conversion between float types go through torch and takes a bfloat16 product in fp32; the
child processes call it before any kernel runs, and test_the_corrected_interpreter_rounds_as_the_gpu_does checks it."""

import numpy as np
import torch


def correct():
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    types = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
             tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    bits = {32: torch.int32, 16: torch.int16, 8: torch.uint8}
    convert, dot = interpreter._convert_float, interpreter.InterpreterBuilder.create_dot

    def convert_float(data, src, dst, rounding_mode):
        if src in types and dst in types:
            t = torch.from_numpy(np.ascontiguousarray(data).copy()).view(bits[src.primitive_bitwidth])
            return t.view(types[src]).to(types[dst]).view(bits[dst.primitive_bitwidth]).numpy()
        return convert(data, src, dst, rounding_mode)

    def create_dot(self, a, b, acc, *args):
        if a.dtype == tl.bfloat16:  # stored as uint16: widen the bits to fp32's
            as_fp32 = lambda h: (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(np.matmul(as_fp32(a), as_fp32(b), dtype=np.float32) + acc.data,
                                            acc.dtype.scalar)
        return dot(self, a, b, acc, *args)

    interpreter._convert_float, interpreter.InterpreterBuilder.create_dot = convert_float, create_dot
