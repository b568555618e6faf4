"""Speed, memory and bias of ``kl_calibration_error`` (all three variants).

Run (one thread, as measured):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kl_calibration_error.py [--quick]

1. Canonical speed at n = 2,000, K = 10 and K = 100, bandwidth selection included, against the published
   code's formulation (:func:`published_formulation_kl_ce`, written here from the paper's equations, no
   third-party code):

   - the Dirichlet log-kernel as one matmul per bandwidth, log P · (A − 1)ᵀ minus the log-Beta normaliser of
     each kernel (A = P / b + 1), the diagonal set to −inf; for each of the 55 bandwidths of
     ``DEFAULT_BANDWIDTHS`` the leave-one-out log-likelihood Σ_i logsumexp_j − log(n − 1); first best b kept;
   - at that b, predictions with ``requires_grad`` (the graph is built, as the published code does to take
     the gradient of the convex function), the label vote in log space: for K <= 20 one broadcast
     logsumexp over an (n, n, K) tensor of log-kernel + log one-hot, for K > 20 a Python loop over classes
     (one (n, n) logsumexp each);
   - the KL error as the Bregman divergence of the negative entropy F(q) = Σ q log q, with ∇F(p) by autograd:
     mean_i F(ĉ_i) − F(p_i) − ⟨∇F(p_i), ĉ_i − p_i⟩.

2. Peak memory (VmHWM of a fresh subprocess) and time of each variant at n = 5,000, K = 1,000 (canonical also
   at n = 10,000), and the GPU path at n = 50,000, K = 1,000 where CUDA is available.
3. Time of one call at n = 5,000, K = 10 (the report's per-bin size), selection included, and with b fixed.
4. Canonical and top-label values on perfectly calibrated synthetic data (labels drawn from the predictions)
   and on the same logits sharpened ×2, at n = 1,000 and 5,000.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import time

import torch

from recalx_lightning.metrics import DEFAULT_BANDWIDTHS, kl_calibration_error

COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kl_calibration_error.py"


def published_log_kernel(probs: torch.Tensor, b: float) -> torch.Tensor:
    """(n, n) matrix log Dir(p_i; α_j = p_j / b + 1) as one matmul; diagonal −inf."""
    alpha = probs / b + 1
    log_beta = torch.lgamma(alpha).sum(1) - torch.lgamma(alpha.sum(1))
    log_kernel = probs.log() @ (alpha - 1).T - log_beta[None, :]
    return log_kernel.masked_fill(torch.eye(probs.shape[0], dtype=torch.bool), -math.inf)


def published_formulation_kl_ce(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The published code's formulation as described in the module docstring: (CE_KL, bandwidth)."""
    n, k = probs.shape
    best, bandwidth = -math.inf, None
    with torch.no_grad():
        for b in DEFAULT_BANDWIDTHS:
            ll = float((torch.logsumexp(published_log_kernel(probs, b), 1) - math.log(n - 1)).sum())
            if ll > best:
                best, bandwidth = ll, b
    p = probs.clone().requires_grad_(True)
    log_kernel = published_log_kernel(p, bandwidth)
    log_onehot = torch.nn.functional.one_hot(labels, k).double().log()  # 0 / −inf
    log_den = torch.logsumexp(log_kernel, 1)
    if k <= 20:
        log_num = torch.logsumexp(log_kernel[:, :, None] + log_onehot[None, :, :], 1)
    else:
        log_num = torch.stack([torch.logsumexp(log_kernel + log_onehot[None, :, c], 1) for c in range(k)], 1)
    vote = torch.exp(log_num - log_den[:, None])

    def negative_entropy(q: torch.Tensor) -> torch.Tensor:
        return torch.xlogy(q, q).sum(1)

    f_p = negative_entropy(p)
    grad = torch.autograd.grad(f_p.sum(), p, create_graph=True)[0]
    kl = (negative_entropy(vote) - f_p - (grad * (vote - p)).sum(1)).mean()
    return float(kl.detach()), bandwidth


def dirichlet_data(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    return torch.softmax(logits, 1), torch.randint(k, (n,), generator=g)


def bench_speed(n: int, k: int) -> None:
    probs, labels = dirichlet_data(n, k)
    start = time.perf_counter()
    fast = kl_calibration_error(probs, labels, input_type="probs")
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    ref_value, ref_b = published_formulation_kl_ce(probs, labels)
    t_ref = time.perf_counter() - start
    print(f"[speed] n={n} K={k} canonical (selection over {len(DEFAULT_BANDWIDTHS)} bandwidths included)")
    print(f"  ours                 {t_fast:8.2f} s  value {float(fast.value):.12f}  b={fast.bandwidth:.4g}")
    print(f"  published formulation {t_ref:7.2f} s  value {ref_value:.12f}  b={ref_b:.4g}")
    print(f"  ratio {t_ref / t_fast:.1f}x   |diff| {abs(float(fast.value) - ref_value):.2e}")


def bench_report_size(n: int = 5000, k: int = 10, repeats: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(k, (n,), generator=g)
    for bandwidth in (None, 0.05):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = kl_calibration_error(logits, labels, bandwidth=bandwidth)
            times.append(time.perf_counter() - start)
        what = "selection included" if bandwidth is None else f"b fixed at {bandwidth}"
        print(f"[report size] n={n} K={k} ({what}): best of {repeats} {min(times):.3f} s per call, "
              f"value {float(result.value):.6f}, b={result.bandwidth:.4g}")


def run_memory_child(n: int, k: int, variant: str, device: str = "cpu") -> None:
    probs, labels = dirichlet_data(n, k)
    logits, labels = probs.log().to(device), labels.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = kl_calibration_error(logits, labels, variant=variant)
    value = float(result.value)
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
    else:
        # VmHWM of this process image: ru_maxrss would inherit the parent's peak across fork + exec.
        with open("/proc/self/status") as status:
            hwm = [line for line in status if line.startswith("VmHWM:")]
        kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = f"peak RSS {kb / 1024:.0f} MB (process incl. torch import)"
    print(f"[memory] {variant} n={n} K={k} {device}: {elapsed:.1f} s, {peak}, value {value:.4f}, "
          f"b={result.bandwidth:.4g}", flush=True)


def bench_variants_memory(quick: bool) -> None:
    n = 2000 if quick else 5000
    for variant in ("canonical", "top_label", "classwise"):
        subprocess.run([sys.executable, __file__, "--memory-child", str(n), "1000", variant, "cpu"], check=True)
    if not quick:
        subprocess.run([sys.executable, __file__, "--memory-child", "10000", "1000", "canonical", "cpu"], check=True)
    if torch.cuda.is_available():
        for variant in ("canonical", "top_label", "classwise"):
            subprocess.run([sys.executable, __file__, "--memory-child", "50000", "1000", variant, "cuda"], check=True)
    else:
        print("[memory] n=50000 K=1000 cuda: not run, no GPU")


def bench_calibrated() -> None:
    for k, scale in ((3, 1.0), (5, 1.5), (10, 3.0)):
        for n in (1000, 5000):
            g = torch.Generator().manual_seed(0)
            logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
            labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
            for variant in ("canonical", "top_label"):
                values = [float(kl_calibration_error(logits / tau, labels, variant=variant).value)
                          for tau in (1.0, 0.5)]
                print(f"[calibrated] K={k:2d} logits~N(0,{scale}^2) n={n} {variant:9s}: CE_KL {values[0]:.4f} "
                      f"(calibrated), {values[1]:.4f} (sharpened, tau=0.5)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (n=500 speed, n=2,000 memory)")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        n, k, variant, device = args.memory_child
        run_memory_child(int(n), int(k), variant, device)
        return
    print(f"command: {COMMAND}{' --quick' if args.quick else ''}   torch {torch.__version__}, 1 thread", flush=True)
    for k in (10, 100):
        bench_speed(500 if args.quick else 2000, k)
    bench_report_size()
    bench_variants_memory(args.quick)
    bench_calibrated()


if __name__ == "__main__":
    main()
