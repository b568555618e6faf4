"""Speed, memory and bias of ``kl_calibration_error``.

Run (one thread, as measured):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kl_calibration_error.py [--quick]

1. Speed at n = 2,000, K = 100, bandwidth selection included, against the straightforward formulation
   (:func:`reference_kl_ce`, written here from the maths, no third-party code). What the reference does:

   - for every bandwidth b of ``DEFAULT_BANDWIDTHS`` (20 values), with α_j = p_j / b + 1, it builds the
     Dirichlet log-kernel as an (n, n, K) float64 tensor, (α_jk − 1) · log p_ik, sums it over k and adds the
     normaliser log Γ(Σ_k α_jk) − Σ_k log Γ(α_jk); it sets the diagonal to −inf (leave one out) and scores b
     by Σ_i log((n − 1)⁻¹ Σ_{j≠i} k_b(p_i, p_j)) (logsumexp over j; no extra −log b term, as in the package);
     the first best b on the grid is kept;
   - for that b, with ``requires_grad`` on the predictions (as when the estimator is used as a training
     loss), it rebuilds the (n, n, K) log-kernel under autograd, turns it into row-normalised kernel weights
     and computes the label vote in a Python loop over the K classes (one masked (n, n) reduction per class);
   - it returns mean_i KL(vote_i ‖ p_i) = Σ_k vote_ik (log vote_ik − log p_ik) (0 log 0 = 0), an autograd
     graph node (the graph is built, no backward pass is run).

   At n = 2,000, K = 100 each (n, n, K) tensor is 3.2 GB; at most one is alive at a time.
2. Peak memory (VmHWM of a fresh subprocess) and time at n = 10,000, K = 1,000.
3. Time of one call at n = 5,000, K = 10 (the report's per-bin size), selection included, and with b fixed.
4. Value on perfectly calibrated synthetic data (labels drawn from the predictions) at n = 1,000 and 5,000.
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


def reference_log_kernel(probs: torch.Tensor, b: float) -> torch.Tensor:
    """(n, n) matrix log Dir(p_i; α_j = p_j / b + 1) through an (n, n, K) tensor; diagonal −inf."""
    alpha = probs / b + 1  # (n, K): row j holds the parameters of the kernel centred on sample j
    terms = (alpha[None, :, :] - 1) * probs.log()[:, None, :]  # (n, n, K): (α_jk − 1) log p_ik
    log_norm = torch.lgamma(alpha.sum(1)) - torch.lgamma(alpha).sum(1)  # (n,), one per kernel j
    log_kernel = terms.sum(2) + log_norm[None, :]
    del terms
    eye = torch.eye(probs.shape[0], dtype=torch.bool)
    return log_kernel.masked_fill(eye, -math.inf)


def reference_kl_ce(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The straightforward formulation described in the module docstring: (CE_KL, bandwidth)."""
    n, k = probs.shape
    best, bandwidth = -math.inf, None
    with torch.no_grad():
        for b in DEFAULT_BANDWIDTHS:
            ll = float((torch.logsumexp(reference_log_kernel(probs, b), 1) - math.log(n - 1)).sum())
            if ll > best:
                best, bandwidth = ll, b
    p = probs.clone().requires_grad_(True)
    log_kernel = reference_log_kernel(p, bandwidth)
    kernel = torch.exp(log_kernel - log_kernel.amax(1, keepdim=True))  # row scale cancels in the vote
    denominator = kernel.sum(1)
    votes = []
    for c in range(k):
        votes.append((kernel * (labels == c).to(kernel.dtype)[None, :]).sum(1) / denominator)
    vote = torch.stack(votes, 1)
    kl = (torch.xlogy(vote, vote) - vote * p.log()).sum(1).mean()
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
    ref_value, ref_b = reference_kl_ce(probs, labels)
    t_ref = time.perf_counter() - start
    print(f"[speed] n={n} K={k} (selection over {len(DEFAULT_BANDWIDTHS)} bandwidths included)")
    print(f"  rewrite   {t_fast:8.2f} s  value {float(fast.value):.12f}  b={fast.bandwidth:.4g}")
    print(f"  reference {t_ref:8.2f} s  value {ref_value:.12f}  b={ref_b:.4g}")
    print(f"  speed-up {t_ref / t_fast:.1f}x   |diff| {abs(float(fast.value) - ref_value):.2e}")


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


def run_memory_child(n: int, k: int) -> None:
    probs, labels = dirichlet_data(n, k)
    start = time.perf_counter()
    result = kl_calibration_error(probs.log(), labels)
    elapsed = time.perf_counter() - start
    # VmHWM of this process image: ru_maxrss would inherit the parent's peak (the reference's 3.2 GB tensors)
    # across fork + exec.
    with open("/proc/self/status") as status:
        hwm = [line for line in status if line.startswith("VmHWM:")]
    peak_mb = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[memory] n={n} K={k}: {elapsed:.1f} s, peak RSS {peak_mb:.0f} MB (process incl. torch import), "
          f"value {float(result.value):.4f}, b={result.bandwidth:.4g}")


def bench_calibrated() -> None:
    for k, scale in ((3, 1.0), (5, 1.5), (10, 3.0)):
        for n in (1000, 5000):
            g = torch.Generator().manual_seed(0)
            logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
            labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
            values = [float(kl_calibration_error(logits / tau, labels).value) for tau in (1.0, 0.5)]
            print(f"[calibrated] K={k:2d} logits~N(0,{scale}^2) n={n}: CE_KL {values[0]:.4f} (calibrated), "
                  f"{values[1]:.4f} (sharpened, tau=0.5)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (n=500 speed, n=3,000 memory)")
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        run_memory_child(*args.memory_child)
        return
    print(f"command: {COMMAND}{' --quick' if args.quick else ''}   torch {torch.__version__}, 1 thread")
    bench_speed(500 if args.quick else 2000, 100)
    bench_report_size()
    mem_n = 3000 if args.quick else 10000
    subprocess.run([sys.executable, __file__, "--memory-child", str(mem_n), "1000"], check=True)
    bench_calibrated()


if __name__ == "__main__":
    main()
