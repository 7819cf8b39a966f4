"""Where and how the arithmetic runs: the device, and per machine the memory format and precision.

Users run this on every x86-64 CPU family and on GPUs, so nothing here is assumed from one machine:

* ``resolve_device("auto")`` is CUDA when torch sees a GPU, else the CPU; "cpu", "cuda" and "cuda:N" are explicit.
* On a CPU, ``backend()`` probes once per machine (CPU model and flags, torch version, oneDNN ISA settings,
  threads) and caches the answer under ``<cache>/machine/``. Each risky path runs **in a subprocess** first, so a
  native crash in a kernel costs a probe, never the caller's process:

  - channels-last forward, and forward + backward, of the convolutions known to break oneDNN's AVX2 kernels in
    torch 2.15 (1x1 stride-2 convolutions with a few input channels: "double free or corruption", segfaults or a
    hang on AMD EPYC; reproduced with ``ONEDNN_MAX_CPU_ISA=AVX2`` on AVX-512 machines);
  - bfloat16 autocast, only where oneDNN reports fast bf16 kernels (AVX-512 BF16 / AMX);
  - then the safe candidates are timed on a small residual CNN (28x28, batch 64), separately for evaluation
    (forward) and training (forward + backward), and the faster one is kept.

  Measured on a 2-thread AMD EPYC (AVX2, no AVX-512): channels-last training crashes there, so training runs
  contiguous; evaluation stays channels-last where its forward passes the probe.

* On CUDA: channels-last for both, bfloat16 autocast where the GPU supports it (nothing is known to crash there).

The probe's answer is cached in ``$CHANNELPRUNE_MACHINE_CACHE`` (default ``<cache>/machine``).
``CHANNELPRUNE_TRAIN_FORMAT`` / ``CHANNELPRUNE_EVAL_FORMAT`` (``channels_last`` | ``contiguous``) override the
probe's choice, e.g. to force channels-last training on a machine where the probe refused it for small layers
but the network to train has none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .paths import atomic_write_text, cache_dir

PROBE_VERSION = 2
PROBE_TIMEOUT_S = 90.0  # a hang (seen: 2 threads spinning for 10 minutes) counts as a failure
FORMATS = ("channels_last", "contiguous")
_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_DEFAULT_FPMATH_MODE")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` are checked."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device={device!r} is not allowed; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not allowed; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not allowed; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: torch sees no CUDA GPU here; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        try:
            torch.cuda.init()
        except RuntimeError as exc:  # a worker forked from a parent that had used CUDA
            raise RuntimeError(
                f"device={device!r} is CUDA, but this process was forked after its parent used CUDA, and CUDA "
                "cannot start in such a child: start workers with the 'spawn' or 'forkserver' method "
                "(gym.make_vec(..., vector_kwargs={'context': 'spawn'}); SB3's SubprocVecEnv uses forkserver) "
                "or pass device='cpu'") from exc
    return dev


@dataclass(frozen=True)
class Backend:
    """How to run networks on one device of this machine (see the module docstring for how it is chosen)."""

    device: torch.device
    eval_channels_last: bool
    train_channels_last: bool
    bf16: bool  # fast and safe bfloat16 autocast (what eval_precision="auto" picks; training uses it too)
    machine: str  # names the machine in every timing: CPU model and ISA, threads, or the GPU
    probe: dict = dataclasses.field(default_factory=dict, compare=False)

    def memory_format(self, training: bool) -> torch.memory_format:
        cl = self.train_channels_last if training else self.eval_channels_last
        return torch.channels_last if cl else torch.contiguous_format

    def autocast(self, enabled: bool = True):
        """bfloat16 autocast on this device when ``enabled`` and the backend supports it (else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(enabled and self.bf16))


@contextlib.contextmanager
def cuda_numerics(device: torch.device, *, tf32: bool | None = None, deterministic: bool = True):
    """On a CUDA ``device``: cuDNN's deterministic kernels (same inputs, same result) and, unless ``tf32`` is
    None, TF32 tensor cores on or off for float32 convolutions and matmuls (off: exact float32, as on a CPU);
    the previous settings are restored on exit. A no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.deterministic, cudnn.benchmark = deterministic, cudnn.benchmark and not deterministic
    if tf32 is not None:
        cudnn.allow_tf32 = matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def cpu_name() -> str:
    """CPU model and its widest vector ISA, e.g. "AMD EPYC (avx2)"."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags][:1]
    forced = {v: os.environ[v] for v in _ISA_VARS if os.environ.get(v)}
    extra = ", ".join(isa + [f"{k}={v}" for k, v in forced.items()])
    return f"{model} ({extra})" if extra else model


def cpu_machine() -> str:
    """This CPU as every timing names it, without probing: model and ISA, and the threads torch uses."""
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''}"


def _cpu_key() -> str:
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    blob = json.dumps([PROBE_VERSION, cpu_name(), flags, torch.__version__, torch.get_num_threads(),
                       {v: os.environ.get(v, "") for v in _ISA_VARS}])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ the probe's checks
RISKY_CONVS = [(cin, cout) for cin in (1, 2, 3, 4, 5, 7) for cout in (6, 8, 9, 16)]


def _risky(backward: bool, bf16: bool) -> None:
    """Channels-last 1x1 stride-2 convs with few input channels, at 1 thread and at the process's threads."""
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for cin, cout in RISKY_CONVS:
            conv = nn.Conv2d(cin, cout, 1, stride=2).to(memory_format=torch.channels_last)
            for _ in range(3):
                x = torch.randn(8, cin, 28, 28).contiguous(memory_format=torch.channels_last)
                x.requires_grad_(backward)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
                    out = conv(x).float().sum()
                if backward:
                    out.backward()
    torch.set_num_threads(threads)


def _timing_net() -> nn.Module:
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), block(32, 32, 1), block(32, 64, 2), block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _time_candidates(candidates: list[str], training: bool, rounds: int = 6) -> dict[str, float]:
    """Seconds per batch of 64 (28x28) for each candidate "format/precision": the candidates are timed in turn,
    round after round, and each keeps its best round, so another process's load spreads over all of them."""
    torch.manual_seed(0)
    setups = {}
    for cand in candidates:
        fmt, prec = cand.split("/")
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        setups[cand] = (_timing_net().to(memory_format=mf).train(training),
                        torch.randn(64, 1, 28, 28).contiguous(memory_format=mf), prec == "bf16")
    best = dict.fromkeys(candidates, float("inf"))
    for r in range(rounds + 1):  # round 0 warms up
        for cand, (net, x, bf16) in setups.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(training):
                y = net(x).float().sum()
            if training:
                y.backward()
            if r:
                best[cand] = min(best[cand], time.perf_counter() - t0)
    return best


def _run_check(name: str, arg: str = "") -> tuple[bool, str]:
    """Run one check of this module in a fresh interpreter; (passed, how it failed)."""
    cmd = [sys.executable, "-m", "envs.machine", "--check", name] + ([arg] if arg else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return False, f"hung for more than {PROBE_TIMEOUT_S:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        how = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else \
            f"exit code {proc.returncode}"
        return False, f"{how}: {tail}" if tail else how
    return True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def _override(var: str) -> bool | None:
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    if value not in FORMATS:
        raise ValueError(f"${var}={value!r} is not allowed; allowed: {', '.join(FORMATS)}")
    return value == "channels_last"


def probe_cpu() -> dict:
    """Run the checks (each in a subprocess) and time the safe candidates; see the module docstring."""
    t0 = time.perf_counter()
    res: dict = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        bf16_hw = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older builds lack the query
        bf16_hw = False
    checks = {"eval_channels_last": ("risky", "forward"), "train_channels_last": ("risky", "backward")}
    if bf16_hw:
        checks |= {"eval_bf16": ("risky", "forward-bf16"), "train_bf16": ("risky", "backward-bf16")}
    failures = {}
    for key, (check, arg) in checks.items():
        ok, why = _run_check(check, arg)
        res[key + "_safe"] = ok
        if not ok:
            failures[key] = why
    res["failures"] = failures
    for training, tag in ((False, "eval"), (True, "train")):
        cands = ["contiguous/fp32"]
        if res[f"{tag}_channels_last_safe"]:
            cands.append("channels_last/fp32")
            if res.get(f"{tag}_bf16_safe"):
                cands.append("channels_last/bf16")
        ok, line = _run_check("time-train" if training else "time-eval", ",".join(cands))
        times = json.loads(line) if ok else {"contiguous/fp32": 1.0}
        res[f"{tag}_seconds_per_batch"] = times
        fp32 = {c: t for c, t in times.items() if c.endswith("fp32")}
        res[f"{tag}_format"] = min(fp32, key=fp32.get).split("/")[0]
        bf = times.get("channels_last/bf16")
        res[f"{tag}_bf16"] = bf is not None and bf < 0.9 * times.get("channels_last/fp32", float("inf"))
    res["probe_seconds"] = round(time.perf_counter() - t0, 1)
    return res


MACHINE_CACHE_ENV = "CHANNELPRUNE_MACHINE_CACHE"


def machine_cache_dir() -> Path:
    """``$CHANNELPRUNE_MACHINE_CACHE`` if set, else ``<cache>/machine``: the probe is a fact about the machine."""
    return Path(os.environ.get(MACHINE_CACHE_ENV) or cache_dir() / "machine")


@lru_cache(maxsize=None)
def _cpu_probe_cached(key: str) -> dict:
    path = machine_cache_dir() / f"cpu-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    print(f"probing this CPU's safe and fast convolution paths (once; cached in {path}) ...", file=sys.stderr)
    res = probe_cpu()
    atomic_write_text(path, json.dumps(res, indent=2))
    return res


def backend(device: str | torch.device = "auto") -> Backend:
    """The memory formats and precision to use on ``device`` of this machine (probed once per CPU, cached)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        name = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
        be = Backend(dev, True, True, bool(torch.cuda.is_bf16_supported()), name)
    else:
        p = _cpu_probe_cached(_cpu_key())  # keyed by cpu_name() and the threads, among others
        be = Backend(dev, p["eval_format"] == "channels_last", p["train_format"] == "channels_last",
                     bool(p["eval_bf16"]) and bool(p.get("train_bf16_safe", False)), cpu_machine(), p)
    ev, tr = _override("CHANNELPRUNE_EVAL_FORMAT"), _override("CHANNELPRUNE_TRAIN_FORMAT")
    if ev is not None or tr is not None:
        be = dataclasses.replace(be, eval_channels_last=be.eval_channels_last if ev is None else ev,
                                 train_channels_last=be.train_channels_last if tr is None else tr)
    return be


def _main(argv: list[str]) -> int:
    """``python -m envs.machine`` prints this machine's backend; ``--check NAME [ARG]`` runs one probe check."""
    if argv[:1] == ["--check"]:
        name, arg = argv[1], (argv[2] if len(argv) > 2 else "")
        if name == "risky":
            _risky(backward=arg.startswith("backward"), bf16=arg.endswith("bf16"))
            print("ok")
        elif name in ("time-eval", "time-train"):
            print(json.dumps(_time_candidates(arg.split(","), training=name == "time-train")))
        else:
            raise SystemExit(f"unknown check {name!r}")
        return 0
    be = backend(argv[0] if argv else "auto")
    print(json.dumps({**dataclasses.asdict(be), "device": str(be.device)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
