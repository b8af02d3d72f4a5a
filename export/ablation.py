"""Ablation of the classifier's design choices over seeds.

``python -m export.ablation --config configs/train.yaml --seeds 0 1 --out runs/ablation
[--variants baseline,no_se] [key.path=value ...]`` trains, for every seed:

* ``baseline``: the config as is (SE + MixUp + CutMix + RandAugment all on);
* ``no_se``: the same slim architecture without squeeze-and-excitation;
* ``no_mixup``, ``no_cutmix``, ``no_randaugment``: one augmentation switched off.

Each run is scored on the held-out clips at its *last* epoch (no checkpoint selection on the
held-out set), and the script writes ``ablation.md`` (mean ± std over seeds of cone top-1,
the lowest per-colour recall and the background rejection) and ``ablation.json``. With
``data.cache=PATH`` it needs nothing but the repo and the cache, e.g. on a GPU machine.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "no_se": [],  # filled in from the config's architecture (its no-SE twin)
    "no_mixup": ["augment.mixup.enabled=false"],
    "no_cutmix": ["augment.cutmix.enabled=false"],
    "no_randaugment": ["augment.randaugment.enabled=false"],
}
FIGURES = (("cone_accuracy", "cone top-1 %"), ("min_cone_recall", "min colour recall %"),
           ("background_rejection", "bg rejection %"), ("accuracy", "top-1 (all) %"))


def no_se_twin(arch: str) -> str:
    """``se_resnet_slim32`` → ``resnet_slim32`` (must be registered)."""
    from export.model import REGISTRY

    twin = arch.removeprefix("se_")
    if twin == arch or twin not in REGISTRY:
        raise ValueError(f"model.arch {arch!r} has no registered no-SE twin {twin!r}")
    return twin


def run_variants(config: str, seeds: list[int], out: Path, variants: list[str],
                 overrides: list[str]) -> list[dict]:
    """Train every variant for every seed; returns one record per run."""
    from export.train import train
    from export.train_config import load_train_config

    base = load_train_config(config, overrides)
    records = []
    for name in variants:
        extra = list(VARIANTS[name])
        if name == "no_se":
            extra.append(f"model.arch={no_se_twin(base.model.arch)}")
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            cfg = load_train_config(config, overrides + extra + [
                f"run.seed={seed}", f"run.out={run_dir}"])
            print(f"=== {name} seed {seed}: {' '.join(extra) or '(config as is)'}", flush=True)
            t0 = time.perf_counter()
            metrics = train(cfg)
            wall = time.perf_counter() - t0
            print(f"=== {name} seed {seed}: {wall:.0f} s", flush=True)
            records.append({"variant": name, "seed": seed, "arch": cfg.model.arch,
                            "wall_s": wall, "metrics": metrics})
    return records


def summarise(records: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant → figure → (mean, std over seeds)."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == name]
        row = {}
        for key, _ in FIGURES:
            vals = np.array([r["metrics"][key] for r in runs if r["metrics"].get(key) is not None],
                            float)
            row[key] = (float(vals.mean()), float(vals.std())) if len(vals) else (float("nan"),
                                                                                  0.0)
        row["wall_s"] = (float(np.mean([r["wall_s"] for r in runs])),
                         float(np.std([r["wall_s"] for r in runs])))
        table[name] = row
    return table


def markdown(table: dict, seeds: list[int], arch: str) -> str:
    head = "| variant | " + " | ".join(t for _, t in FIGURES) + " | wall s |"
    lines = [f"Held-out clips, last epoch, mean ± std over seeds {seeds} (baseline: {arch}).", "",
             head, "|" + "---|" * (len(FIGURES) + 2)]
    for name, row in table.items():
        cells = [f"{100 * row[k][0]:.1f} ± {100 * row[k][1]:.1f}" for k, _ in FIGURES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['wall_s'][0]:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.ablation",
                                     description="SE / MixUp / CutMix / RandAugment ablation.")
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("overrides", nargs="*", help="key.path=value applied to every run "
                        "(after the last option, or after --)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: --variants: unknown {unknown}; choose from {list(VARIANTS)}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        records = run_variants(args.config, args.seeds, out, variants, args.overrides)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = summarise(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"seeds": args.seeds, "runs": records,
                                                   "summary": table}, indent=2))
    text = markdown(table, args.seeds, records[0]["arch"] if records else "?")
    (out / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
