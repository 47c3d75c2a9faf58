"""Make torch, on a machine without a GPU, believe it has one NVIDIA H100 (sm_90), for torch.compile's benefit.

    import fake_h100
    fake_h100.install()  # BEFORE `import torch`: torch reads its CUDA hooks once, at import
    import torch

Tensors on "cuda" must then be FakeTensorMode tensors (shapes, strides and dtypes; no data, no memory, no kernel
launches). On them torch.compile runs the whole CUDA pipeline on the CPU: dynamo -> AOTAutograd (forward and
backward) -> inductor's CUDA lowering -> Triton code generation -> ptxas, which builds every kernel into an sm_90a
cubin. Nothing is ever loaded or launched, so this finds compile-time problems only, never numerics or speed.

Four layers, each needed:
  1. C++ (built once with g++, cached): a CPU build of torch lacks a CUDA DeviceGuardImpl (every autograd node records
     its input's device and stream) and CUDA hooks whose hasCUDA() is true (the autograd engine asks the accelerator
     for the current stream of a cuda gradient). We register c10's own test double FakeGuardImpl<CUDA>, which ships
     in the wheel's headers, and hooks that say "one CUDA device". Without them fake cuda tensors have no backward
     and AOTAutograd cannot trace the joint graph.
  2. torch.cuda and dynamo's CudaInterface answer device queries as an H100 SXM (capability 9.0, 132 SMs, 232448 B of
     opt-in shared memory per block).
  3. Triton gets a driver that needs no libcuda: kernels are compiled for target cuda:90 and recorded, never loaded.
  4. Inductor: compile in this process (worker processes would not see these patches), and two passes that run real
     device ops at compile time are turned off (constant folding in the joint graph; pad_mm, which times matmuls).

Supported: Linux x86-64, the CPU build of torch 2.13, triton==3.7.1 (the version torch 2.13's CUDA build pins),
a C++ compiler (g++, or $CXX). `unsupported()` and `missing()` say what is wrong without importing torch.
"""

import atexit
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

TRITON_VERSION = "3.7.1"  # what torch 2.13's CUDA build pins (its METADATA: triton==3.7.1)
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may opt in to on an H100 (sm_90)

H100 = types.SimpleNamespace(  # torch.cuda.get_device_properties() of an H100 SXM 80GB
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=85_045_231_616, multi_processor_count=132,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536, warp_size=32,
    shared_memory_per_block=49152, shared_memory_per_block_optin=SHARED_MEMORY_LIMIT,
    shared_memory_per_multiprocessor=233472, L2_cache_size=52_428_800, is_integrated=0, is_multi_gpu_board=0,
    gcnArchName="NVIDIA H100 80GB HBM3", uuid="00000000-0000-0000-0000-000000000000", pci_bus_id=0,
    pci_device_id=0, pci_domain_id=0,
)

COMPILED_KERNELS: list = []  # every Triton CompiledKernel built since install(), in order

_HOOKS_SOURCE = r"""
// Fake CUDA for a CPU-only torch: a device guard (c10's FakeGuardImpl) and hooks that report one CUDA device.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace fake_h100 {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

struct CUDAHooks : public at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isAvailable() const override { return true; }
  bool isBuilt() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex current_device() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
};
}  // namespace fake_h100
namespace at { C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, fake_h100::CUDAHooks); }
"""

# Run in a subprocess (this process must not import torch before the hooks are loaded): where torch's headers and
# libraries are, and its C++ ABI.
_TORCH_BUILD_INFO = """
import json, torch, torch.utils.cpp_extension as ext
print(json.dumps(dict(include=ext.include_paths(), lib=ext.library_paths(), abi=int(torch._C._GLIBCXX_USE_CXX11_ABI),
                      cuda=torch.version.cuda)))
"""


class ToolchainError(RuntimeError):
    """The machine cannot run the fake H100 (wrong platform, a CUDA build of torch, no triton, no C++ compiler)."""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def unsupported() -> str | None:
    """Why this machine cannot run the fake H100 at all (another platform, a CUDA build of torch); None if it can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (f"the fake H100 needs Linux x86-64 (triton's ptxas, torch's CPU build for Linux); this is "
                f"{sys.platform} {platform.machine()}")
    spec = importlib.util.find_spec("torch")
    if spec is not None and (Path(spec.origin).parent / "lib" / "libtorch_cuda.so").exists():
        return "this torch is a CUDA build: on a GPU machine the tests marked gpu compile for the real device"
    return None


def missing() -> list[str]:
    """What this (supported) machine lacks to run the fake H100, each with its fix; [] when nothing."""
    found = []
    if importlib.util.find_spec("torch") is None:
        found.append("torch is not installed")
    try:
        version = importlib.metadata.version("triton")
        if version != TRITON_VERSION:
            found.append(f"triton {version} is installed; the check needs triton=={TRITON_VERSION}, the version "
                         f"torch 2.13's CUDA build pins (pip install triton=={TRITON_VERSION})")
    except importlib.metadata.PackageNotFoundError:
        found.append(f"triton is not installed: pip install triton=={TRITON_VERSION} (requirements.txt has it)")
    if _compiler() is None:
        found.append("no C++ compiler to build the fake CUDA hooks: install g++ (apt-get install g++) or set $CXX")
    return found


def problems() -> list[str]:
    """Everything that keeps this machine from faking an H100; [] when nothing does. Does not import torch."""
    reason = unsupported()
    return [reason] if reason else missing()


def cache_dir() -> Path:
    """Where the hooks library is kept: $FAKE_H100_CACHE, else the user's cache folder, else the temp folder."""
    if os.environ.get("FAKE_H100_CACHE"):
        return Path(os.environ["FAKE_H100_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base / "speedrun-fake-h100"
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "speedrun-fake-h100"


def hooks_library() -> Path:
    """The fake CUDA hooks as a shared library, built with the C++ compiler on first use (~20-40 s) and cached by
    torch version and source, so that a new torch gets a new build."""
    torch_version = importlib.metadata.version("torch")
    key = hashlib.sha256((_HOOKS_SOURCE + torch_version).encode()).hexdigest()[:12]
    target = cache_dir() / f"torch-{torch_version}" / f"fake_cuda_hooks-{key}.so"
    if target.exists():
        return target
    info = subprocess.run([sys.executable, "-c", _TORCH_BUILD_INFO], capture_output=True, text=True)
    if info.returncode != 0:
        raise ToolchainError(f"cannot import torch to find its headers:\n{info.stderr[-2000:]}")
    info = json.loads(info.stdout.strip().splitlines()[-1])
    if info["cuda"]:
        raise ToolchainError(f"this torch is built for CUDA {info['cuda']}: there is nothing to fake")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "fake_cuda_hooks.cpp"
        source.write_text(_HOOKS_SOURCE)
        built = Path(tmp) / target.name
        command = [_compiler(), "-shared", "-fPIC", "-O1", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={info['abi']}",
                   *(f"-I{d}" for d in info["include"]), str(source), "-o", str(built),
                   *(f"-L{d}" for d in info["lib"]), "-lc10", "-ltorch_cpu"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolchainError(f"building the fake CUDA hooks failed ({' '.join(command[:2])} ...):\n"
                                 f"{result.stderr[-3000:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key simply wins or loses the race
    return target


def install():
    """Loads the fake CUDA hooks, imports torch and makes it see one H100. Call once, before anything imports torch."""
    if "torch" in sys.modules:
        raise RuntimeError("fake_h100.install() must run before torch is imported: torch reads its CUDA hooks once")
    found = problems()
    if found:
        raise ToolchainError("cannot fake an H100 here: " + "; ".join(found))
    library = hooks_library()
    # the traced optimizer step reads fake scalars as numbers; torch warns about it, but nothing real is touched
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    # Fresh compile caches: nothing from (or for) a real GPU is reused, and every kernel really goes through ptxas.
    scratch = tempfile.mkdtemp(prefix="fake_h100_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    torch_lib = Path(importlib.util.find_spec("torch").origin).parent / "lib"
    for name in ("libc10.so", "libtorch_cpu.so"):  # the hooks library links against these; load them globally first
        ctypes.CDLL(str(torch_lib / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # its static initializers register the guard and the hooks

    import torch

    if torch.cuda._is_compiled():
        raise ToolchainError("this torch has CUDA: never fake it")
    if str(torch._C._accelerator_getAccelerator()) != "cuda":
        raise ToolchainError("the fake CUDA hooks were not picked up (was torch imported before install()?)")
    _patch_torch_cuda(torch)
    _patch_triton()
    _patch_attention_patterns(torch)
    _configure_inductor(torch)
    _give_inductor_the_datasheet(torch)
    return torch


def _patch_torch_cuda(torch):
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.set_device = lambda device: None
    c.synchronize = lambda device=None: None
    c.get_device_properties = lambda device=None: H100
    c.get_device_capability = lambda device=None: (H100.major, H100.minor)
    c.get_device_name = lambda device=None: H100.name
    c.is_bf16_supported = lambda including_emulation=True: True
    c.get_arch_list = lambda: ["sm_80", "sm_90"]
    c._lazy_init = lambda: None
    c.is_initialized = lambda: True
    c.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)  # dynamo saves and restores it
    c.set_rng_state = lambda new_state, device="cuda": None
    c._exchange_device = lambda device: 0  # torch.cuda.device(i) context managers
    c._maybe_exchange_device = lambda device: 0
    torch._C._cuda_getCurrentRawStream = lambda index: 0  # imported by every generated cuda module

    from torch._dynamo import device_interface

    ci = device_interface.CudaInterface
    for name, fn in dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
                         set_device=lambda device: None, synchronize=lambda device=None: None,
                         get_device_properties=lambda device=None: H100, get_compute_capability=lambda device=None: 90,
                         is_triton_capable=lambda device=None: True,
                         is_bf16_supported=lambda including_emulation=False: True, get_raw_stream=lambda index: 0,
                         exchange_device=lambda device: 0, maybe_exchange_device=lambda device: 0).items():
        setattr(ci, name, staticmethod(fn))
    ci.Worker.current_device = staticmethod(lambda: 0)
    ci.Worker.get_device_properties = staticmethod(lambda device=None: H100)
    device_interface.caching_worker_device_properties["cuda"] = [H100]


def _patch_triton():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class Utils:
        def get_device_properties(self, device):
            return dict(max_shared_mem=H100.shared_memory_per_block_optin, max_num_regs=H100.regs_per_multiprocessor,
                        multiprocessor_count=H100.multi_processor_count, warpSize=32, sm_clock_rate=1_980_000,
                        mem_clock_rate=2_619_000, mem_bus_width=5120)

        def load_binary(self, *args, **kwargs):
            raise RuntimeError("fake H100: a cubin cannot be loaded without a GPU")

    class Driver(CudaDriver):
        def __init__(self):  # not CudaDriver's: that compiles a helper against libcuda.so
            self.utils = Utils()
            self.launcher_cls = None
            self.get_device_capability = lambda device=None: (H100.major, H100.minor)
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Driver())
    compile_kernel = triton.compile

    def compile_and_record(src, target=None, options=None, **kwargs):
        kernel = compile_kernel(src, target=target, options=options, **kwargs)
        COMPILED_KERNELS.append(kernel)
        return kernel

    triton.compile = compile_and_record

    from torch._inductor.runtime import triton_heuristics

    def precompile(self, warm_cache_only=False, reload_kernel=None, static_triton_bundle_key=None):
        """Build every config of the kernel into a cubin (that is the check), then stop: no launcher, no load."""
        with self.lock:
            if not self.compile_results:
                self._precompile_worker()

    triton_heuristics.CachingAutotuner.precompile = precompile


def _patch_attention_patterns(torch):
    """Inductor traces its attention-fusion patterns on example tensors made on the input's device under a fake mode;
    torch.tensor(2.0, device="cuda") there would need a real CUDA copy. Make it torch.full, which the fake mode
    handles, while the patterns are built."""
    from torch._inductor.fx_passes import fuse_attention

    init, tensor = fuse_attention._sfdp_init, torch.tensor

    def fake_friendly_tensor(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda" and isinstance(data, (int, float)):
            return torch.full((), data, device=device, **kwargs)
        return tensor(data, *args, device=device, **kwargs)

    def sfdp_init(input_device=None):
        torch.tensor = fake_friendly_tensor
        try:
            return init(input_device)
        finally:
            torch.tensor = tensor

    fuse_attention._sfdp_init = sfdp_init


def _configure_inductor(torch):
    import torch._inductor.config as inductor

    inductor.compile_threads = 1  # in this process: subprocess workers would not see the patches
    inductor.joint_graph_constant_folding = False  # it evaluates small constants for real, on the device
    inductor.shape_padding = False  # pad_mm decides by timing padded and unpadded matmuls on the device
    torch._functorch.config.force_non_lazy_backward_lowering = True  # compile the backward now, not at .backward()


def _give_inductor_the_datasheet(torch):
    """Inductor prices each kernel it schedules (BaseSchedulerNode.get_estimated_runtime) with the device's peak FLOP/s
    for the kernel's output dtype and its DRAM bandwidth. torch ships the H100 SXM's datasheet figures
    (torch/_inductor/analysis/device_info.py, "NVIDIA H100") but looks them up by the exact device name, which for an
    H100 SXM is "NVIDIA H100 80GB HBM3"; missing it, inductor asks nvidia-smi for the clock and, with none here, prices
    every kernel at 0 ms. So the fake device's name maps to torch's own entry, with float8_e4m3fn (absent from it) at
    the FP8 figure it gives float8_e5m2; the bandwidth is the entry's 3,350 GB/s instead of triton's figure from the
    fake memory clock (3,352)."""
    import dataclasses

    from torch._inductor import scheduler, utils
    from torch._inductor.analysis import device_info

    h100 = device_info.lookup_device_info("NVIDIA H100")
    entry = dataclasses.replace(h100, tops={**h100.tops, torch.float8_e4m3fn: h100.tops[torch.float8_e5m2]})
    device_info._device_mapping[H100.name.upper()] = entry
    bandwidth = lambda: entry.dram_bw_gbs
    utils.get_gpu_dram_gbps = scheduler.get_gpu_dram_gbps = bandwidth
    import torch.utils._runtime_estimation as runtime_estimation

    runtime_estimation.get_gpu_dram_gbps = bandwidth


def to_fake_cuda(t, fake_mode):
    """A fake cuda tensor with the shape, strides and dtype of t (any real or meta tensor); no data."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return FakeTensor(fake_mode, meta, torch.device("cuda", 0))


def module_to_fake_cuda(module, fake_mode):
    """Moves every parameter and buffer of module to fake cuda tensors (Parameters stay Parameters)."""
    return module._apply(lambda t: to_fake_cuda(t, fake_mode))


def kernel_resources(kernel) -> dict:
    """Registers, local memory (spills and stack) and shared memory of a compiled Triton kernel, read from its cubin
    with the cuobjdump that ships in the triton wheel (a GPU would read them when loading the module)."""
    import re

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {kernel.name}: {out[-500:]}")
    registers, stack, _, local = map(int, m.groups())
    target = kernel.metadata.target
    return dict(name=kernel.name, hash=kernel.hash, target=f"{target.backend}:{target.arch}",
                num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                shared=kernel.metadata.shared, registers=registers, local=local, stack=stack)
