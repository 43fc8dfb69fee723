"""Time and peak extra memory of the entropy + log-prob backends against the usual PyTorch paths.

    .venv/bin/python benchmarks/entropy.py                      # N=4096, V_local in {19008, 32768, 152064}
    .venv/bin/python benchmarks/entropy.py --rows 512 --widths 19008 --repeat 3

For each shard width, bf16 logits [N, V_local] and random targets, forward ("fwd": entropy and log-prob)
and forward+backward ("fwd+bwd": gradient of sum(H) + sum(logp) w.r.t. the logits), in one process:

* naive     the plain PyTorch computation: upcast to fp32, log_softmax, softmax, sum(p * logp), gather;
* megatron  megatron-core's vocab_parallel_cross_entropy (TP = 1, gloo) for the log-prob, plus a
            verl-style entropy (softmax of the fp32 logits, logsumexp - sum(p * z)) for the entropy;
* ours/<backend>  nemo_entropy.entropy.vocab_parallel_entropy_and_logprobs with each backend available
            here (the CPU extension if built, the chunked PyTorch reference).

Time: best of --repeat runs after one warm-up, --threads intra-op threads for every method (default 1:
the machine is shared; ratios are what matters). Peak extra memory: the process's peak resident set
during the call (Linux VmHWM, reset through /proc/self/clear_refs before each run) minus the resident set
before it, minus the gradient of the logits for fwd+bwd (an output every method must return: bf16,
the size of the shard); the script re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 so that freed
tensors leave the resident set. Reported in MiB and as a fraction of the bf16 shard's size. Ratios are against
the naive path (time) and as multiples of the shard (memory).

With ``--device cuda`` (a GPU machine with a CUDA torch; ``benchmarks/gpu_check.sh`` runs it; never run
on the development machines, which have no GPU) the same table is produced for the CUDA extension and the
Triton kernel, timed with ``torch.cuda.synchronize`` (times in ms) and with peak extra memory from
``torch.cuda.max_memory_allocated``, plus two columns against the memory roofline of docs/kernels.md:

* GB/s: the bytes the fused computation must move (bf16: ``2V + 24`` per token forward, ``6V + 52``
  forward+backward; fp32 logits double the ``V`` terms) divided by the time; the same numerator for every
  method, so it is an effective bandwidth (a method that moves more bytes scores lower);
* % of peak: that over the GPU's peak memory bandwidth, from NVML (memory clock x bus width) when pynvml is
  installed, else a table of published specifications, else ``--peak-gbps``. The header also reports what a
  plain device-to-device copy reaches, the practical ceiling.

``--peak-gbps`` also adds these columns on CPU (``gpu_check.sh --dry-run`` uses that to exercise them).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_entropy.entropy import build, vocab_parallel_entropy_and_logprobs  # noqa: E402

MiB = 1 << 20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    return _status_kib("VmRSS")


# Published peak memory bandwidth (GB/s) by device-name fragment, for when NVML cannot be asked. The first
# matching fragment wins, so more specific names come first.
PEAK_GBPS_BY_NAME = (
    ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000), ("H200", 4800), ("H20", 4000),
    ("B200", 8000), ("GB200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600), ("RTX 4090", 1008), ("V100", 900),
)


def peak_bandwidth_gbps(device: torch.device, override: float = None):
    """(peak GB/s, where it came from) of the device's memory, or (None, reason)."""
    if override:
        return float(override), "--peak-gbps"
    if device.type != "cuda":
        return None, "not a GPU (pass --peak-gbps)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        if clock_mhz and bus_bits:
            # Double data rate: two transfers per memory clock (HBM2e/HBM3 and GDDR6 as NVML reports them).
            return 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9, f"NVML: {clock_mhz} MHz x {bus_bits} bit"
    except Exception:  # pynvml missing or the query unsupported: fall back to the table
        pass
    name = torch.cuda.get_device_name(index)
    for fragment, gbps in PEAK_GBPS_BY_NAME:
        if fragment in name:
            return float(gbps), f"published spec of {fragment}"
    return None, f"unknown GPU {name!r} (pass --peak-gbps)"


def copy_bandwidth_gbps(device: torch.device) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write), best of 5: the practical ceiling."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * (1 << 30) / best / 1e9


def roofline_bytes(rows: int, width: int, element_size: int, mode: str) -> int:
    """Bytes the fused computation must move (docs/kernels.md): read the logits once per pass, write the
    gradient once, plus the O(1)-per-token targets, statistics and incoming gradients."""
    if mode == "fwd":
        return rows * (element_size * width + 24)
    return rows * (3 * element_size * width + 52)


def naive(logits, targets):
    """The textbook path: several fp32 copies of the whole shard."""
    x = logits.float()
    logp_all = torch.log_softmax(x, dim=-1)
    p = torch.softmax(x, dim=-1)
    entropy = -(p * logp_all).sum(-1)
    return entropy, logp_all.gather(-1, targets[:, None]).squeeze(-1)


def _init_megatron(device):
    import torch.distributed as dist  # benchmark-local set-up of a one-process group for megatron-core

    from tests.support.distributed import free_port

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cpu":
        torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def megatron_plus_verl(logits, targets):
        logprob = -vocab_parallel_cross_entropy(logits[:, None, :], targets[:, None]).squeeze(1)
        x = logits.float()
        p = torch.softmax(x, dim=-1)
        entropy = torch.logsumexp(x, dim=-1) - (p * x).sum(-1)
        return entropy, logprob

    return megatron_plus_verl


def _ours(backend):
    def run(logits, targets):
        return vocab_parallel_entropy_and_logprobs(logits, targets, backend=backend)

    return run


def measure(fn, logits, targets, mode, repeat):
    """(best seconds, peak extra bytes) of one method; ``(None, None)`` if it runs out of GPU memory."""
    try:
        return _measure(fn, logits, targets, mode, repeat)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return None, None


def _measure(fn, logits, targets, mode, repeat):
    best, peak = float("inf"), 0
    cuda = logits.device.type == "cuda"
    for i in range(repeat + 1):
        x = logits.detach().requires_grad_(mode == "fwd+bwd")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base_kib = _reset_peak()
        start = time.perf_counter()
        entropy, logprob = fn(x, targets)
        if mode == "fwd+bwd":
            (entropy.sum() + logprob.sum()).backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if cuda:
            extra = torch.cuda.max_memory_allocated() - base
        else:
            extra = (_status_kib("VmHWM") - base_kib) * 1024
        if mode == "fwd+bwd":
            extra -= x.grad.numel() * x.grad.element_size()
        del entropy, logprob, x
        if i > 0:  # the first run is the warm-up (imports, self-check, first-touch of the allocator)
            best = min(best, elapsed)
            peak = max(peak, extra)
    return best, max(0, peak)


def main(argv=None) -> int:
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc serves allocations below a (growing) threshold from a heap it keeps after free, so a
        # method's temporaries could reuse pages an earlier method left resident and never show in the
        # peak. A fixed 64 KiB threshold maps every sizeable tensor fresh and unmaps it on free.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--widths", type=int, nargs="+", default=[19008, 32768, 152064])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-megatron", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="peak memory bandwidth for the GB/s and %% of peak columns (default on CUDA: NVML, "
                        "else published specs; on CPU the columns appear only with this option)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_gbps, peak_source = peak_bandwidth_gbps(device, args.peak_gbps)
    roofline = device.type == "cuda" or args.peak_gbps is not None

    methods = [("naive", naive)]
    if not args.skip_megatron:
        try:
            methods.append(("megatron+verl", _init_megatron(device)))
        except Exception as err:  # megatron-core is optional
            print(f"# megatron-core unavailable ({type(err).__name__}: {err}); skipping that baseline")
    if device.type == "cuda":
        if build.load_cuda_extension() is not None:
            methods.append(("ours/cuda", _ours("cuda")))
        else:
            print("# CUDA extension not built (nemo-entropy build-kernels): ours/cuda skipped")
        methods.append(("ours/triton", _ours("triton")))
    elif build.load_cpu_extension() is not None:
        methods.append(("ours/cpu", _ours("cpu")))
    else:
        print("# CPU extension not built (nemo-entropy build-kernels): ours/cpu skipped")
    methods.append(("ours/reference", _ours("reference")))

    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
    print(f"# bf16 logits, N = {args.rows} rows, {where}, torch {torch.__version__}, best of {args.repeat}")
    print("# time ratio = naive time / method time (higher is faster); memory = peak extra / bf16 shard size")
    if roofline:
        print("# GB/s = roofline bytes (bf16: 2V+24 per token fwd, 6V+52 fwd+bwd; docs/kernels.md) / time; "
              "peak memory bandwidth: " + (f"{peak_gbps:.0f} GB/s ({peak_source})" if peak_gbps else peak_source))
        if cuda:
            copy = copy_bandwidth_gbps(device)
            share = f" = {copy / peak_gbps:.0%} of peak" if peak_gbps else ""
            print(f"# a device-to-device copy reaches {copy:.0f} GB/s here{share} (the practical ceiling)")
    columns = ["V_local", "mode", "method", "time (ms)" if cuda else "time (s)", "speed-up vs naive"]
    columns += ["GB/s", "% of peak"] if roofline else []
    columns += ["peak extra (MiB)", "extra / shard"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for width in args.widths:
        # Generated where it is used: 4096 x 152064 random numbers take seconds on a CPU.
        gen = torch.Generator(device=device).manual_seed(width)
        logits = (torch.randn(args.rows, width, generator=gen, device=device) * 2).to(torch.bfloat16)
        targets = torch.randint(0, width, (args.rows,), generator=gen, device=device)
        shard_bytes = logits.numel() * logits.element_size()
        for mode in ("fwd", "fwd+bwd"):
            naive_time = None
            for name, fn in methods:
                seconds, extra = measure(fn, logits, targets, mode, args.repeat)
                naive_time = seconds if name == "naive" else naive_time
                if seconds is None:
                    cells = ["out of memory", "-"] + (["-", "-"] if roofline else []) + ["-", "-"]
                else:
                    cells = [f"{seconds * 1e3:.3f}" if cuda else f"{seconds:.3f}",
                             f"{naive_time / seconds:.2f}x" if naive_time else "-"]
                    if roofline:
                        gbps = roofline_bytes(args.rows, width, logits.element_size(), mode) / seconds / 1e9
                        cells += [f"{gbps:.0f}" if gbps >= 10 else f"{gbps:.2f}",
                                  f"{gbps / peak_gbps:.1%}" if peak_gbps else "-"]
                    cells += [f"{extra / MiB:.0f}", f"{extra / shard_bytes:.1%}"]
                print(f"| {width} | {mode} | {name} | " + " | ".join(cells) + " |", flush=True)
        del logits
    print("# shard sizes (bf16): " + ", ".join(f"{w}: {args.rows * w * 2 / MiB:.0f} MiB" for w in args.widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
