"""Inference, ours vs torchvision's FasterRCNN: same weights, same image, alternating calls.

    .venv/bin/python benchmarks/bench_inference.py                 # both cases, 2 threads, CPU
    .venv/bin/python benchmarks/bench_inference.py --cases r18_320 --iterations 20
    .venv/bin/python benchmarks/bench_inference.py --device cuda --threads 8

Prints the machine, then per case and implementation: latency median / p90 (ms), images/s,
memory (weights + the call's peak working set, MB), the time split by component (ms), the
ratio ours / torchvision, and whether the detections are the same (at score threshold 0, so
random weights give 100 per image; matched by label, box within 0.05 px, score within 1e-3).
"""

from __future__ import annotations

from comparison import case_config, case_models, header, parser, row, setup

from pipeline.profile.reference_models import detections_at_threshold
from pipeline.profile.timing import (
    InferenceWorkload,
    compare_detections,
    measure_alternating,
    model_bytes,
    peak_call_bytes,
    synthetic_images,
)

MB = 2**20


def main() -> None:
    args = parser(__doc__.split("\n")[0], warmup=2, iterations=10).parse_args()
    setup(args)
    print(header("ms"))
    for case in args.cases:
        cfg, height, width = case_config(case)
        models, components = case_models(cfg, args.device)
        images = synthetic_images(1, height, width, seed=0, device=args.device)
        workloads = {
            name: InferenceWorkload(m, images, components=components[name]) for name, m in models.items()
        }
        timings = measure_alternating(
            workloads,
            device=args.device,
            batch_size=1,
            warmup=args.warmup,
            iterations=args.iterations,
            desc=case,
        )
        memory = {
            name: (model_bytes(models[name]) + peak_call_bytes(w, args.device, repeats=args.memory_repeats))
            / MB
            for name, w in workloads.items()
        }
        for name in models:
            print(row(case, name, timings[name], memory[name], "ms"))
        reference = timings["torchvision"].median_s
        names = ["ours", "ours_as_tv", "torchvision"]
        outputs = dict(zip(names, detections_at_threshold([models[n] for n in names], images), strict=True))
        for name in ("ours", "ours_as_tv"):
            diff = compare_detections(outputs[name], outputs["torchvision"])
            same = diff["unmatched"] == 0
            print(
                f"{case:8} {name}/torchvision: latency {timings[name].median_s / reference:.3f}, "
                f"memory {memory[name] / memory['torchvision']:.3f}; detections "
                f"{'identical' if same else 'DIFFER'} ({diff['detections']:.0f}, "
                f"max box diff {diff['max_box_diff']:.2g} px, max score diff {diff['max_score_diff']:.2g})"
            )
        for w in workloads.values():
            w.close()


if __name__ == "__main__":
    main()
