"""Training step (forward + backward + SGD step), ours vs torchvision's FasterRCNN: same
weights, same two images and targets, alternating steps.

    .venv/bin/python benchmarks/bench_train_step.py                # both cases, batch 2, 2 threads
    .venv/bin/python benchmarks/bench_train_step.py --cases r18_320 --iterations 10

Prints the machine, then per case and implementation: step time median / p90 (ms), images/s,
memory (weights + the step's peak working set, MB), the split forward / backward / optimizer
(ms), and the ratio ours / torchvision.
"""

from __future__ import annotations

from comparison import case_config, case_models, header, parser, row, setup

from pipeline.profile.timing import (
    TRAIN_STEP_PARTS,
    TrainStepWorkload,
    measure_alternating,
    model_bytes,
    peak_call_bytes,
    synthetic_images,
    synthetic_targets,
)

MB = 2**20


def main() -> None:
    p = parser(__doc__.split("\n")[0], warmup=1, iterations=5)
    p.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    args = p.parse_args()
    setup(args)
    print(header("step ms"))
    for case in args.cases:
        cfg, height, width = case_config(case)
        models, _ = case_models(cfg, args.device)
        images = synthetic_images(args.batch_size, height, width, seed=1, device=args.device)
        targets = synthetic_targets(images, cfg.num_classes, seed=0)
        workloads = {name: TrainStepWorkload(m, images, targets) for name, m in models.items()}
        timings = measure_alternating(
            workloads,
            device=args.device,
            batch_size=args.batch_size,
            warmup=args.warmup,
            iterations=args.iterations,
            parts=TRAIN_STEP_PARTS,
            desc=case,
        )
        memory = {
            name: (model_bytes(models[name]) + peak_call_bytes(w, args.device, repeats=args.memory_repeats))
            / MB
            for name, w in workloads.items()
        }
        for name in models:
            print(row(case, name, timings[name], memory[name], "step ms"))
        for name in ("ours", "ours_as_tv"):
            ratio = timings[name].median_s / timings["torchvision"].median_s
            print(
                f"{case:8} {name}/torchvision: step time {ratio:.3f} (images/s {1 / ratio:.3f}x), "
                f"memory {memory[name] / memory['torchvision']:.3f}; last losses "
                f"{workloads[name].last_loss:.4f} / {workloads['torchvision'].last_loss:.4f}"
            )


if __name__ == "__main__":
    main()
