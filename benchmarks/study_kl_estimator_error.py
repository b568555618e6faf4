"""Bias and RMSE of the KL calibration error estimators on synthetic data with a known true error.

    OMP_NUM_THREADS=1 python benchmarks/study_kl_estimator_error.py [--quick] [--out docs/results] [--replot]

Generator: logits z = s·ε + u·e_r (ε ~ N(0, I_K), s = 2, one random class r boosted by u ~ U(0, 8), so that
confidences range from near 1/K to near 1), predictions p = softmax(a·z), labels y ~ q = softmax(z). Then
E[Y | p] = q (p ↦ z is one-to-one), so a = 1 is calibrated and a = 0.5 / 2 are under- / over-confident.

True values (no label noise enters them):

- canonical: E[KL(q ‖ p)], the mean of the closed form over ``TRUTH_SAMPLES`` draws of z;
- top-label: E[KL_bin(m(c) ‖ c)] with c = max_k p_k and m(c) = E[q_argmax | c], estimated by sorting the
  draws by c and averaging q_argmax over groups of ``GROUP`` consecutive draws;
- classwise: the same for (p_0, q_0) (classes are exchangeable, so class 0 stands for every class).

At a = 1 all three are exactly 0. Each cell runs ``kl_calibration_error`` (the public API) on fresh samples,
for every variant and bandwidth rule, and reports bias = mean(estimate) − truth and RMSE over the replicates.
Replicates are fewer in the large cells to keep the full run near 15 minutes on one thread (5 at n = 500,
3 at n = 2,000 (2 at K = 1,000), 1 at n = 5,000); at n = 5,000 only the likelihood rule runs, and the classwise
variant (K·n² kernel entries) is skipped at K = 1,000, n = 5,000 (≈ 70 s per estimate, timed in
``bench_kl_calibration_error.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from recalx_lightning.metrics import kl_calibration_error

SCALE, BOOST = 2.0, 8.0
TRUTH_SAMPLES, GROUP = 200_000, 200
SEED = 2024
ESTIMATORS = [(v, r) for v in ("canonical", "top_label", "classwise") for r in ("likelihood", "label_loss")]
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/study_kl_estimator_error.py"


def draw(n: int, k: int, a: float, generator: torch.Generator, labels: bool = True):
    """(logits a·z, labels ~ softmax(z) or None, z)."""
    z = torch.randn(n, k, generator=generator, dtype=torch.float64) * SCALE
    boost = torch.rand(n, generator=generator, dtype=torch.float64) * BOOST
    z[torch.arange(n), torch.randint(k, (n,), generator=generator)] += boost
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1) if labels else None
    return a * z, y, z


def _binary_kl(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    m = m.clamp(1e-300, 1 - 1e-16)
    c = c.clamp(1e-300, 1 - 1e-16)
    return m * (m / c).log() + (1 - m) * ((1 - m) / (1 - c)).log()


def _grouped_truth(c: torch.Tensor, q: torch.Tensor) -> float:
    """E[KL_bin(E[q | c] ‖ c)] with E[q | c] by averaging q over groups of GROUP draws sorted by c."""
    order = torch.argsort(c)
    c, q = c[order], q[order]
    usable = (len(c) // GROUP) * GROUP
    m = q[:usable].view(-1, GROUP).mean(1).repeat_interleave(GROUP)
    return float(_binary_kl(m, c[:usable]).mean())


def truth(k: int, a: float, samples: int, seed: int) -> dict[str, float]:
    """True canonical, top-label and classwise errors of the generator at (K, a)."""
    if a == 1.0:
        return {"canonical": 0.0, "top_label": 0.0, "classwise": 0.0}
    g = torch.Generator().manual_seed(seed)
    canonical, conf, conf_q, p0, q0 = [], [], [], [], []
    chunk = max(1, 2_000_000 // k)
    for start in range(0, samples, chunk):
        logits, _, z = draw(min(chunk, samples - start), k, a, g, labels=False)
        log_p, log_q = torch.log_softmax(logits, 1), torch.log_softmax(z, 1)
        canonical.append((log_q.exp() * (log_q - log_p)).sum(1))
        top = log_p.argmax(1, keepdim=True)
        conf.append(log_p.gather(1, top).exp().squeeze(1))
        conf_q.append(log_q.gather(1, top).exp().squeeze(1))
        p0.append(log_p[:, 0].exp())
        q0.append(log_q[:, 0].exp())
    cat = torch.cat
    return {
        "canonical": float(cat(canonical).mean()),
        "top_label": _grouped_truth(cat(conf), cat(conf_q)),
        "classwise": _grouped_truth(cat(p0), cat(q0)),
    }


def replicates(n: int, k: int, quick: bool) -> int:
    if quick or n >= 5000:
        return 1
    return 5 if n <= 500 else 3 if k < 1000 else 2


def runs(variant: str, rule: str, n: int, k: int) -> bool:
    """The cells each estimator runs in: at n = 5,000 only the paper's bandwidth rule (the rules are compared
    at n <= 2,000), and classwise not at K = 1,000, n = 5,000."""
    if n >= 5000 and rule != "likelihood":
        return False
    return not (variant == "classwise" and k * n > 2_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n in {500, 2000}, fewer replicates and truth draws")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--replot", action="store_true", help="rewrite the Markdown from an existing JSON")
    parser.add_argument("--update", nargs="+", metavar="VARIANT/RULE",
                        help="recompute only these estimators in an existing JSON (same draws; truths reused)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.replot:
        payload = json.loads((Path(args.out) / "kl_estimator_error.json").read_text())
        quick = payload.get("quick", args.quick)
        (Path(args.out) / "kl_estimator_error.md").write_text(markdown(payload["cells"], quick, payload["seconds"]))
        return
    sizes = (500, 2000) if args.quick else (500, 2000, 5000)
    classes, scales = (2, 10, 100, 1000), (0.5, 1.0, 2.0)
    truth_samples = 50_000 if args.quick else TRUTH_SAMPLES
    start = time.perf_counter()
    cells = []
    previous, chosen = {}, ESTIMATORS
    if args.update:
        payload = json.loads((Path(args.out) / "kl_estimator_error.json").read_text())
        previous = {(c["K"], c["n"], c["a"]): c for c in payload["cells"]}
        chosen = [tuple(name.split("/")) for name in args.update]
        if not all(e in ESTIMATORS for e in chosen):
            raise SystemExit(f"--update takes names among {[f'{v}/{r}' for v, r in ESTIMATORS]}")
    for k in classes:
        for a in scales:
            old = previous.get((k, sizes[0], a))
            true = old["truth"] if old else truth(k, a, truth_samples, SEED + k)
            for n in sizes:
                reps = replicates(n, k, args.quick)
                estimates: dict[str, list[float]] = {f"{v}/{r}": [] for v, r in ESTIMATORS}
                for rep in range(reps):
                    g = torch.Generator().manual_seed(SEED + 7919 * rep + 31 * n + k + int(100 * a))
                    logits, y, _ = draw(n, k, a, g)
                    for variant, rule in chosen:
                        if not runs(variant, rule, n, k):
                            continue
                        value = kl_calibration_error(logits, y, variant=variant, bandwidth_rule=rule).value
                        estimates[f"{variant}/{rule}"].append(float(value))
                row = {"K": k, "n": n, "a": a, "replicates": reps, "truth": true, "estimators": {}}
                if previous:
                    row["estimators"] = dict(previous[(k, n, a)]["estimators"])
                for name, values in estimates.items():
                    if not values:
                        continue
                    t = true[name.split("/")[0]]
                    mean = sum(values) / len(values)
                    rmse = math.sqrt(sum((v - t) ** 2 for v in values) / len(values))
                    row["estimators"][name] = {"mean": mean, "bias": mean - t, "rmse": rmse}
                cells.append(row)
                print(f"[{time.perf_counter() - start:6.0f} s] K={k} a={a} n={n} ({reps} reps) truth "
                      + " ".join(f"{key} {val:.4f}" for key, val in true.items()) + " | "
                      + " ".join(f"{key} {e['mean']:.4f}" for key, e in row["estimators"].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - start
    if args.update:  # the run time of the study is that of the full run
        elapsed = payload["seconds"]
    payload = {"cells": cells, "seconds": elapsed, "quick": args.quick}
    (out / "kl_estimator_error.json").write_text(json.dumps(payload, indent=1))
    (out / "kl_estimator_error.md").write_text(markdown(cells, args.quick, elapsed))
    print(f"wrote {out / 'kl_estimator_error.md'} in {elapsed:.0f} s")


def markdown(cells: list[dict], quick: bool, elapsed: float) -> str:
    names = [f"{v}/{r}" for v, r in ESTIMATORS]
    lines = [
        "# KL calibration error estimators: bias and RMSE against a known truth",
        "",
        f"`{COMMAND}{' --quick' if quick else ''}` ({elapsed / 60:.1f} min, one thread). Synthetic logits z, "
        "predictions softmax(a·z), labels drawn from softmax(z): a = 1 is calibrated (true error 0 for every "
        "variant), a = 0.5 under-, a = 2 over-confident. Each entry: estimate mean (bias, RMSE) over the "
        "replicates, nats; `truth` per variant (canonical / top-label / classwise). Bandwidth rules: `lik` = "
        "leave-one-out likelihood of the predictions' density (the paper's), `loss` = leave-one-out log loss of "
        "the label estimate. Classwise uses the top-label problem's bandwidth. Replicates: 5 at n = 500, 3 at "
        "n = 2,000 (2 at K = 1,000), 1 at n = 5,000 (RMSE = |error| there); at n = 5,000 only `lik` runs and "
        "classwise is not run at K = 1,000, n = 5,000 (70 s per estimate).",
    ]
    header = [
        "| K | a | n | reps | truth (can / top / cw) | " + " | ".join(
            n.replace("likelihood", "lik").replace("label_loss", "loss") for n in names) + " |",
        "|---:|---:|---:|---:|---|" + "---:|" * len(names),
    ]
    lines += [
        "",
        "Summary per K: RMSE averaged over the cells (a, n) each estimator ran in, and the calibrated reading "
        "(mean estimate at a = 1, largest n run) next to the a = 2 one (same n).",
        "",
        "| K | " + " | ".join(n.replace("likelihood", "lik").replace("label_loss", "loss") for n in names) + " |",
        "|---:|" + "---|" * len(names),
    ]
    for k in sorted({c["K"] for c in cells}):
        entries = []
        for name in names:
            mine = [c for c in cells if c["K"] == k and name in c["estimators"]]
            if not mine:
                entries.append("–")
                continue
            rmse = sum(c["estimators"][name]["rmse"] for c in mine) / len(mine)
            largest = max(c["n"] for c in mine)
            at = {c["a"]: c["estimators"][name]["mean"] for c in mine if c["n"] == largest}
            entries.append(f"RMSE {rmse:.3f}; a=1: {at.get(1.0, math.nan):.3f}, a=2: {at.get(2.0, math.nan):.3f} "
                           f"(n={largest})")
        lines.append(f"| {k} | " + " | ".join(entries) + " |")
    lines += ["", *reading(cells, names), "", "Per cell:", "", *header]
    for c in cells:
        t = c["truth"]
        entries = []
        for name in names:
            e = c["estimators"].get(name)
            entries.append("–" if e is None else f"{e['mean']:.3f} ({e['bias']:+.3f}, {e['rmse']:.3f})")
        lines.append(f"| {c['K']} | {c['a']:g} | {c['n']} | {c['replicates']} | "
                     f"{t['canonical']:.3f} / {t['top_label']:.3f} / {t['classwise']:.3f} | " + " | ".join(entries)
                     + " |")
    return "\n".join(lines) + "\n"


def reading(cells: list[dict], names: list[str]) -> list[str]:
    """Sentences written from the numbers (so that a rerun stays truthful).

    Errors are compared relative to the truth (the classwise truth is ~1/K of the others), over the
    miscalibrated cells (a ≠ 1); the calibrated reading is compared with the a = 2 truth it must be told from.
    """

    def relative_rmse(name: str, k: int) -> float:
        mine = [c["estimators"][name]["rmse"] / c["truth"][name.split("/")[0]]
                for c in cells if c["K"] == k and c["a"] != 1.0 and name in c["estimators"]]
        return sum(mine) / len(mine) if mine else math.nan

    def separation(name: str, k: int) -> float:
        """Calibrated reading (a = 1, largest n run) as a share of the a = 2 truth."""
        mine = [c for c in cells if c["K"] == k and c["a"] == 1.0 and name in c["estimators"]]
        sharp = [c for c in cells if c["K"] == k and c["a"] == 2.0]
        if not mine or not sharp:
            return math.nan
        return max(mine, key=lambda c: c["n"])["estimators"][name]["mean"] / sharp[0]["truth"][name.split("/")[0]]

    parts = []
    for k in sorted({c["K"] for c in cells}):
        best = min(names, key=lambda name: (math.isnan(relative_rmse(name, k)), relative_rmse(name, k)))
        shares = ", ".join(f"{name} {100 * separation(name, k):.0f}%" for name in names
                           if name.endswith("likelihood"))
        parts.append(f"K = {k}: lowest relative RMSE {best} ({100 * relative_rmse(best, k):.0f}% of the truth); "
                     f"calibrated reading as a share of the a = 2 truth: {shares}")
    return ["**Reading** (relative RMSE = RMSE / truth over the a ≠ 1 cells, averaged). " + "; ".join(parts)
            + ". A calibrated reading far below the a = 2 truth means the estimator tells the two apart."]


if __name__ == "__main__":
    main()
