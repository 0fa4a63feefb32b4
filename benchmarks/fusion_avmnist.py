"""Every fusion on AV-MNIST under DP, against the best single modality: the results table.

Each row is real ``fedmm simulate`` runs (Flower simulation, six speaker sites, 20
rounds, DP-SGD with every site's epsilon <= 8 at delta 1e-5, RDP accountant) on the
built-in AV-MNIST, one per seed (seeds change the initial weights, the Poisson draws
and the noise); the single-modality rows train the same ``concat`` model on one
modality. Accuracy is the mean over seeds with the per-seed values; 300 test samples
make one seed's accuracy uncertain by about +-1.5 points (binomial standard error). Also: half the sites without audio (exactly 3 of 6), a
multi-task row (digit + speaker heads) and a contrastive-alignment row.

Columns: test accuracy, max epsilon over sites and seeds, parameters (model_card.json),
DP training samples/s of one site (local DP-SGD epochs, in-process, one thread as a
simulated site trains; measured after all runs, cases interleaved, median of 5) and
the mean wall time of a run.

Usage: python benchmarks/fusion_avmnist.py [--seeds 0,1,2] [--rounds 20] [--only concat,late] [--out benchmarks/results/fusion_avmnist.md]
Embedding fusion needs a pretrained image encoder: made by pretrain_image_encoder.py
from public MNIST images (../shared/data/mnist) unless --image-weights is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedmm.config import RunConfig
from fedmm.data.avmnist import builtin_root, load_site
from fedmm.models import ModelRecipe
from fedmm.plan import batch_size
from fedmm.privacy.accounting import SiteAccountant
from fedmm.runtime.simulation import run_simulation
from fedmm.site.training import DPSettings, train

HALF_AUDIO = {"missing-modality-sites": "audio:0.5"}
CASES: list[tuple[str, dict[str, object]]] = [
    ("image only", {"modalities": "image"}),
    ("audio only", {"modalities": "audio"}),
    ("concat", {"model": "concat"}),
    ("gated", {"model": "gated"}),
    ("attention", {"model": "attention"}),
    ("late", {"model": "late"}),
    ("image only (pretrained)", {"modalities": "image", "model": "embedding", "image-encoder": "pretrained"}),
    ("embedding", {"model": "embedding", "image-encoder": "pretrained"}),
    ("concat + speaker head", {"tasks": "speaker:0.5"}),
    ("concat + align", {"contrastive": "align"}),
    ("concat, 3/6 sites no audio", {"model": "concat", **HALF_AUDIO}),
    ("attention, 3/6 sites no audio", {"model": "attention", **HALF_AUDIO}),
    ("late, 3/6 sites no audio", {"model": "late", **HALF_AUDIO}),
]


def epoch_seconds(cfg: RunConfig, seed: int) -> tuple[int, float]:
    """One local DP-SGD epoch of one site (george), one thread: (records, seconds)."""
    recipe = ModelRecipe.from_config(cfg)
    data = recipe.prepare(load_site(builtin_root(), "george"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = recipe.build(data.schema)
        dp = DPSettings(noise_multiplier=1.0, max_grad_norm=cfg.max_grad_norm, grad_sample_mode=cfg.grad_sample_mode, accountant=SiteAccountant(cfg.accountant))
        start = time.perf_counter()
        train(model, data, epochs=1, batch_size=batch_size(cfg), learning_rate=recipe.learning_rate(data.schema), momentum=0.0, seed=seed, dp=dp, objective=recipe.objective(data.schema))
        return len(data), time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def run_case(name: str, overrides: dict[str, object], rounds: int, seed: int, runs: Path) -> dict[str, object]:
    slug = name.replace(" ", "_").replace(",", "").replace("/", "of").replace("+", "plus")
    cfg = RunConfig.from_run_config({"rounds": rounds, "seed": seed, "runs-dir": str(runs), "run-name": f"{slug}-seed{seed}", **overrides})
    outcome = run_simulation(cfg, on_line=lambda line: None)
    if not outcome.ok:
        return {"case": name, "seed": seed, "error": f"{outcome.status} {outcome.details} (log {outcome.log_file})"}
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    card = json.loads((outcome.run_dir / "model_card.json").read_text())
    rounds_log = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    row: dict[str, object] = {
        "case": name, "seed": seed, "accuracy": summary["final_accuracy"], "epsilon": summary["max_epsilon"],
        "parameters": card["parameters"], "wall_s": summary["wall_seconds"], "settings": overrides,
    }
    row.update({k: v for k, v in rounds_log[-1].items() if k.startswith("accuracy_")})
    return row


def summarise(name: str, runs: list[dict[str, object]], throughput: float) -> dict[str, object]:
    """One table row from the runs of one case (all seeds)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"case": name, "error": "; ".join(str(r["error"]) for r in failed)}
    accuracies = [float(r["accuracy"]) for r in runs]  # type: ignore[arg-type]
    row: dict[str, object] = {
        "case": name, "accuracy": statistics.mean(accuracies), "per_seed": accuracies,
        "epsilon": max(float(r["epsilon"]) for r in runs), "parameters": runs[0]["parameters"],  # type: ignore[arg-type]
        "dp_samples_per_s": throughput, "wall_s": statistics.mean(float(r["wall_s"]) for r in runs),  # type: ignore[arg-type]
        "settings": runs[0]["settings"],
    }
    tasks = sorted({k for r in runs for k in r if k.startswith("accuracy_")})
    if tasks:
        row["tasks"] = {k: statistics.mean(float(r[k]) for r in runs) for k in tasks}  # type: ignore[arg-type]
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| case | accuracy: mean (per seed) | max epsilon | parameters | DP samples/s (1 site, 1 thread) | wall s a run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | |")
            continue
        tasks = "".join(f" ({k.removeprefix('accuracy_')} {v:.3f})" for k, v in r.get("tasks", {}).items())  # type: ignore[attr-defined]
        seeds = ", ".join(f"{a:.3f}" for a in r["per_seed"])  # type: ignore[attr-defined]
        lines.append(
            f"| {r['case']} | {r['accuracy']:.3f} ({seeds}){tasks} | {r['epsilon']:.3f} | {r['parameters']:,} | {r['dp_samples_per_s']:.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=5, help="throughput: epochs per case (median)")
    parser.add_argument("--only", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--image-weights", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fusion_avmnist.md")
    args = parser.parse_args()
    chosen = [c for c in CASES if not args.only or c[0] in args.only.split(",")]
    runs = Path(tempfile.mkdtemp(prefix="fedmm-fusion-bench-"))
    weights = args.image_weights
    if weights is None and any(o.get("image-encoder") == "pretrained" for _, o in chosen):
        from pretrain_image_encoder import pretrain  # type: ignore[import-not-found]

        weights = runs / "mnist-public-cnn.pt"
        figures = pretrain(weights, Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
        print(f"pretrained image encoder: {figures}")
    chosen = [(n, {**o, "image-weights": str(weights)} if o.get("image-encoder") == "pretrained" else o) for n, o in chosen]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, object]]] = {name: [] for name, _ in chosen}
    for seed in seeds:  # seed-major: a partial run still covers every case
        for name, overrides in chosen:
            results[name].append(run_case(name, overrides, args.rounds, seed, runs))
            print(json.dumps(results[name][-1]), flush=True)
    # Throughput after the runs, cases interleaved, so machine drift hits all alike.
    timings: dict[str, list[float]] = {name: [] for name, _ in chosen}
    for r in range(args.repeats + 1):
        for name, overrides in chosen:
            n, seconds = epoch_seconds(RunConfig.from_run_config(overrides), seed=r)
            if r:  # the first pass warms up
                timings[name].append(n / seconds)
    rows = [summarise(name, results[name], statistics.median(timings[name])) for name, _ in chosen]
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
