"""Training-step time and memory of LWTA networks against the same networks with ReLU, side by side.

    python benchmarks/lwta_overhead.py                                   # ResNet-18 CIFAR and the small CNN, CPU
    python benchmarks/lwta_overhead.py --models resnet18 --rounds 9 --out runs/lwta_overhead.json
    python benchmarks/lwta_overhead.py --device cuda --precision bf16 --models resnet18 vit_tiny   # the GPU suite

Networks: ResNet-18 with the CIFAR stem (32x32, batch 128, SGD) and the small Fashion-MNIST CNN conv32-conv64-fc256
(28x28x1, batch 128, Adam; benchmarks/fmnist_accuracy.py's CNN48 at those widths); ``vit_tiny`` (32x32, patch 4)
for the GPU suite. Variants of each, in both memory formats (contiguous and channels-last, ``cl``; ``--layouts``):
ReLU eager and compiled; LWTA at each U with the reference layer (``impl="reference"``), the fused kernel
(``impl="auto"``, eager) and the fused kernel compiled (on CUDA, where the fused kernel does not run, the
reference eager and compiled).

Timing: every variant runs one step per round, in turn, for ``--rounds`` rounds after warm-up, so machine
drift hits all alike; the median step per variant is reported. **Targets** (issue 15) compare each side in its
fastest mode: LWTA/ReLU = min over LWTA's modes / min over ReLU's (eager or compiled, either layout), medians of
the rounds; at most 1.10 for U=2 and 1.25 for U=16 on ResNet-18, 1.3 on the small CNN. The compiled/eager ReLU
ratio says what compiling buys.

Memory (``--memory``, on by default): each eager variant of the first layout runs in a fresh process (large
allocations returned to the OS at once) and reports the peak resident memory a training step adds on top of the
model and its optimizer state (measured on the second step; gradients are freed before it, so they count in the
step), and the bytes autograd keeps for backward (exact, from saved-tensor hooks). On CUDA:
``max_memory_allocated`` over the step, in this process. Target: LWTA/ReLU at most 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lwta_vision.models import create_model  # noqa: E402

TARGETS = {("resnet18", 2): 1.10, ("resnet18", 16): 1.25, ("cnn", 2): 1.3, ("cnn", 16): 1.3}
MEMORY_TARGET = 1.2


def build(model: str, act: str, competitors: int, impl: str) -> tuple[torch.nn.Module, tuple, str]:
    """(network, input shape, optimizer name) for one variant."""
    kw = {"act": act}
    if act == "lwta":
        kw["act_kwargs"] = {"competitors": competitors, "temperature": 1.67, "impl": impl}
    if model == "resnet18":
        return create_model("resnet18", stem="cifar", num_classes=10, **kw), (3, 32, 32), "sgd"
    if model == "vit_tiny":
        return create_model("vit_tiny", image_size=32, patch_size=4, num_classes=10, **kw), (3, 32, 32), "adam"
    if model == "cnn":
        from fmnist_accuracy import CNN48

        return CNN48(act, kw.get("act_kwargs"), widths=(32, 64, 256)), (1, 28, 28), "adam"
    raise SystemExit(f"unknown model {model!r}: resnet18, cnn or vit_tiny")


def label(act: str, competitors: int, impl: str, compiled: bool, cl: bool = False) -> str:
    name = "relu" if act == "relu" else f"lwta U={competitors} {'reference' if impl == 'reference' else 'fused'}"
    return name + (" compiled" if compiled else " eager") + (" cl" if cl else "")


class Variant:
    def __init__(self, model: str, act: str, competitors: int, impl: str, compiled: bool, cl: bool, args):
        self.name = label(act, competitors, impl, compiled, cl)
        self.act, self.competitors, self.impl, self.compiled = act, competitors, impl, compiled
        self.dev = torch.device(args.device)
        torch.manual_seed(0)
        net, shape, opt = build(model, act, competitors, impl)
        self.net = net.to(self.dev)
        if cl:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compiled:
            self.net.compile()
        self.opt = (torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9) if opt == "sgd"
                    else torch.optim.Adam(self.net.parameters(), lr=1e-3))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(args.batch_size, *shape, generator=g).to(self.dev)
        if cl and self.x.ndim == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (args.batch_size,), generator=g).to(self.dev)
        self.bf16 = args.precision == "bf16"
        self.times: list[float] = []

    def step(self) -> float:
        sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.net(self.x), self.y)
        loss.backward()
        self.opt.step()
        sync()
        return time.perf_counter() - t0


def variants_of(model: str, args) -> list[tuple[str, int, str, bool, bool]]:
    """(act, U, impl, compiled, channels-last) for every variant, in both layouts unless --layouts says one."""
    out = []
    cpu = torch.device(args.device).type == "cpu"
    for cl in [layout == "channels-last" for layout in args.layouts]:
        out.append(("relu", 1, "auto", False, cl))
        if args.compile:
            out.append(("relu", 1, "auto", True, cl))
        for u in args.competitors:
            out.append(("lwta", u, "reference", False, cl))
            if cpu:  # the fused kernel is CPU-only: on CUDA "auto" is the reference
                out.append(("lwta", u, "auto", False, cl))
            if args.compile:
                out.append(("lwta", u, "auto" if cpu else "reference", True, cl))
    return out


# -- memory: one eager variant per process ------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(spec: dict) -> dict:
    """Runs in a fresh process: the peak a training step adds (second step), and the bytes saved for backward."""
    args = argparse.Namespace(**spec["args"])
    v = Variant(spec["model"], spec["act"], spec["competitors"], spec["impl"], False, spec["cl"], args)
    v.step()  # optimizer state and allocator warm
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    v.opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(v.dev.type, dtype=torch.bfloat16, enabled=v.bf16):
            F.cross_entropy(v.net(v.x), v.y)
    out = {"saved_mib": sum(saved.values()) / 2 ** 20}
    v.opt.zero_grad(set_to_none=True)
    if v.dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        v.step()
        out["step_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
        v.step()
        out["step_peak_mib"] = (_rss_kib("VmHWM") - before) / 1024
    return out


def measure_memory(model: str, variants, args) -> dict[str, dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = {}
    first = args.layouts[0] == "channels-last"
    for act, u, impl, compiled, cl in variants:
        if compiled or cl != first:  # eager variants of the first layout (the memory formats need the same)
            continue
        spec = {"model": model, "act": act, "competitors": u, "impl": impl, "cl": cl,
                "args": {k: getattr(args, k) for k in ("device", "batch_size", "precision")}}
        if torch.device(args.device).type == "cuda":  # the allocator's own peak: no fresh process needed
            res[label(act, u, impl, False, cl)] = memory_probe(spec)
            continue
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"memory probe failed for {spec}:\n{proc.stderr[-3000:]}")
        res[label(act, u, impl, False, cl)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def profile_groups(v: "Variant", steps: int = 3) -> dict[str, float]:
    """Seconds per step by kind of op (torch.profiler self time): convolutions, the LWTA op, compiled graphs
    (inductor's fused kernels), BatchNorm, the rest."""
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            v.step()
    groups: dict[str, float] = {}
    for e in prof.key_averages():
        k = e.key
        g = ("convolution" if "convolution" in k else "lwta op" if "lwta" in k else
             "compiled graphs" if "CompiledFxGraph" in k or k.startswith("cpp_fused") else
             "batch_norm" if "batch_norm" in k else "other")
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / 1e6 / steps
    return groups


def run_model(model: str, args) -> dict:
    specs = variants_of(model, args)
    t0 = time.perf_counter()
    vs = [Variant(model, *s, args) for s in specs]
    for v in vs:  # warm-up: compiled variants compile here
        for _ in range(2 if v.compiled else 1):
            v.step()
    warm = time.perf_counter() - t0
    for _ in range(args.rounds):
        for v in vs:
            v.times.append(v.step())
    med = {v.name: statistics.median(v.times) for v in vs}
    relu_modes = {k: t for k, t in med.items() if k.startswith("relu")}
    relu_best = min(relu_modes.values())
    summary = {}
    for u in args.competitors:
        modes = {k: t for k, t in med.items() if k.startswith(f"lwta U={u} ")}
        best = min(modes.values())
        summary[u] = {"ratio": best / relu_best, "lwta_mode": min(modes, key=modes.get),
                      "relu_mode": min(relu_modes, key=relu_modes.get),
                      "reference_ratio": min(t for k, t in med.items()
                                             if k.startswith(f"lwta U={u} reference")) / relu_best,
                      "target": TARGETS.get((model, u))}
    out = {"model": model, "median_s": med, "rounds": {v.name: v.times for v in vs}, "summary": summary,
           "warmup_s": warm}
    if args.compile:
        out["relu_compiled_over_eager"] = {
            layout: med[f"relu compiled{sfx}"] / med[f"relu eager{sfx}"]
            for layout, sfx in (("contiguous", ""), ("channels-last", " cl")) if f"relu eager{sfx}" in med}
    if args.profile:
        out["profile_s_per_step"] = {v.name: profile_groups(v) for v in vs}
    if args.memory:
        out["memory"] = measure_memory(model, specs, args)
    return out


def report(res: dict, args) -> None:
    model = res["model"]
    base = next(t for k, t in res["median_s"].items() if k.startswith("relu eager"))
    print(f"\n{model}, batch {args.batch_size}, {args.device}, {args.precision}"
          f", layouts {' + '.join(args.layouts)} (cl: channels-last), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (median), warm-up/compile {res['warmup_s']:.0f} s")
    print(f"{'variant':<32}{'median step (s)':>16}{'vs ' + next(iter(res['median_s'])):>20}")
    for k, t in res["median_s"].items():
        print(f"{k:<32}{t:>16.3f}{t / base:>20.3f}")
    if res.get("relu_compiled_over_eager"):
        print("compiled ReLU / eager ReLU: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                     res["relu_compiled_over_eager"].items()))
    for u, s in res["summary"].items():
        tgt = s["target"]
        verdict = "" if tgt is None else f"  target <= {tgt:.2f}: {'met' if s['ratio'] <= tgt else 'MISSED'}"
        print(f"LWTA U={u} / ReLU, fastest mode each ({s['lwta_mode']} / {s['relu_mode']}): {s['ratio']:.3f}"
              f"{verdict}   (reference layer: {s['reference_ratio']:.3f})")
    for name, groups in res.get("profile_s_per_step", {}).items():
        print(f"profile {name}: " + ", ".join(f"{k} {t:.3f}" for k, t in sorted(groups.items()))
              + f" (s/step, total {sum(groups.values()):.3f})")
    mem = res.get("memory")
    if mem:
        r = next(m for k, m in mem.items() if k.startswith("relu"))
        print(f"{'memory (eager)':<32}{'step peak (MiB)':>16}{'vs relu':>9}{'saved for bwd (MiB)':>21}{'vs relu':>9}")
        for k, m in mem.items():
            print(f"{k:<32}{m['step_peak_mib']:>16.0f}{m['step_peak_mib'] / r['step_peak_mib']:>9.3f}"
                  f"{m['saved_mib']:>21.0f}{m['saved_mib'] / r['saved_mib']:>9.3f}")
        for u in args.competitors:
            name = min((k for k in mem if k.startswith(f"lwta U={u} ")), key=lambda k: mem[k]["step_peak_mib"])
            ratio = mem[name]["step_peak_mib"] / r["step_peak_mib"]
            print(f"memory {name} / ReLU: {ratio:.3f}  target <= {MEMORY_TARGET}: "
                  f"{'met' if ratio <= MEMORY_TARGET else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "cnn"], help="resnet18, cnn, vit_tiny")
    ap.add_argument("--competitors", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of every variant each)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    ap.add_argument("--layouts", nargs="+", choices=["contiguous", "channels-last"],
                    default=["contiguous", "channels-last"], help="memory formats to time (default both)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time torch.compile'd variants (default on)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="measure step memory in fresh processes (default: on for CPU and CUDA)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile each variant: seconds per step by kind of op (what dominates; CPU-side "
                         "time only, so on CUDA it shows launch overhead, not kernel time)")
    ap.add_argument("--out", help="write every timing and figure to this JSON file")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return
    args.memory = True if args.memory is None else args.memory
    results = []
    meta = {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch_size": args.batch_size, "layouts": args.layouts}
    for model in args.models:
        res = run_model(model, args)
        report(res, args)
        results.append(res)
        if args.out:  # after every model, so a run cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
