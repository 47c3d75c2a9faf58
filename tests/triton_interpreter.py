"""Two corrections to Triton 3.7's interpreter (TRITON_INTERPRET=1), which runs our kernels on the CPU in the tests of
tests/test_fused_loss.py and tests/test_fused_mlp.py. It gets two things wrong that the GPU gets right:
  - a float narrowed to bfloat16 or float8 is rounded toward zero and the carry into the exponent is dropped
    (-7.875 to e4m3 gives -4.0), where the GPU rounds to nearest even, as torch does;
  - a bfloat16 tile product multiplies the integers that store the values.
correct() makes every conversion between float types go through torch and takes a bfloat16 product in fp32; importing
this module in a child process (TRITON_INTERPRET=1) calls it, before train_gpt registers its kernels, and
test_the_corrected_interpreter_rounds_as_the_gpu_does checks it. run_child() is the parent's side: Triton decides at
import whether its kernels are interpreted, so the kernel checks run in a child pytest process that sets the variable
before anything imports triton."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_child(test_file: str, passed: int, skipped: int):
    """Runs the file's tests under the interpreter; every check must run (the child skips only what it must)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             test_file], env=env, cwd=Path(test_file).resolve().parent.parent, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{passed} passed, {skipped} skipped in "), result.stdout[-2000:]


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


if INTERPRETED:
    correct()
