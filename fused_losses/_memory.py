"""Peak memory on the CPU: this process's resident memory on Linux (trainer reports,
benchmarks) and the live-tensor peak of a block of torch code (planner validation)."""
from __future__ import annotations

import contextlib

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (writing 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False



class LiveTensorPeak(TorchDispatchMode):
    """The peak bytes of tensor storages allocated inside ``with`` and alive at once.

    A ``TorchDispatchMode`` sees every ATen op (factories, autograd's backward ops and
    ``AccumulateGrad`` included): after each op it drops the storages that died since the last
    one (weak references) and adds each output storage that is new, i.e. not the storage of an
    input (views, in-place and ``out=`` ops allocate nothing). Memory rises only inside an op,
    so the largest sum after any op is the exact peak of live tensor bytes, what
    ``torch.cuda.max_memory_allocated`` counts on a GPU (less its 512-byte rounding), with none
    of peak RSS's allocator noise. It does not see allocations inside one op's kernel (a CPU
    kernel's scratch; cuBLAS and Triton kernels allocate none) nor storages that existed before
    it started (the inputs).

    ``excluding()`` stops counting new storages for its block: for the CPU's stand-ins of GPU
    operations that allocate nothing on CUDA (a 16-bit GEMM upcast to fp32 on the CPU, where
    cuBLAS writes fp32 directly).
    """

    def __init__(self):
        super().__init__()
        self.peak = self.current = 0
        self._live: dict[int, tuple] = {}  # StorageImpl address -> (weak ref, bytes)
        self._excluded = 0

    @contextlib.contextmanager
    def excluding(self):
        self._excluded += 1
        try:
            yield
        finally:
            self._excluded -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(args, kwargs, out)
        return out

    def _prune(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def _record(self, args, kwargs, out) -> None:
        self._prune()
        if self._excluded:
            return
        inputs = None
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                continue
            if inputs is None:  # storages the op was given (tensors, or a storage for set_)
                inputs = {x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor)
                          else x.data_ptr() for x in tree_flatten((args, kwargs))[0]
                          if isinstance(x, (torch.Tensor, torch.UntypedStorage,
                                            torch.TypedStorage))}
            if storage.data_ptr() in inputs:
                continue
            ref = StorageWeakRef(storage)
            if ref.cdata not in self._live:
                self._live[ref.cdata] = (ref, storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
