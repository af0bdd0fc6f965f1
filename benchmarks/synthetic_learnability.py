"""Is the synthetic default learnable? Train torchvision's Faster R-CNN (R18-FPN, from scratch) on it.

    .venv/bin/python benchmarks/synthetic_learnability.py --data data/preprocessed --iterations 870
    .venv/bin/python benchmarks/synthetic_learnability.py          # builds the synthetic default in a temp dir

A check of the data, independent of this project's detector: torchvision's FasterRCNN sized
for a CPU the way the best CPU row of our measured learning table is (ResNet-18 body with GroupNorm, FPN
d=64, anchors 16-256, 256-d box head, RPN 1000/300 in training; ``--roi-batch`` RoIs per image),
trained from scratch with SGD on `pipeline.dataset` (grouped batches, flips), then scored
with pycocotools on the validation split. Prints the machine, the loss every
``--log-every`` steps, and AP, AP50, APs, APm, APl. Stops after ``--iterations`` steps or
``--minutes`` of training, whichever comes first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.config import load_params
from pipeline.dataset import DetectionDataset, GroupedBatchSampler, collate, read_categories, to_model_input
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.preprocess.stage import preprocess_dataset
from pipeline.profile.timing import machine_description


def build_model(
    num_classes: int, min_size: int | tuple[int, ...], max_size: int, roi_batch: int = 64
) -> FasterRCNN:
    body = resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(32, c))
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [64, 128, 256, 512], 64,
        extra_blocks=LastLevelMaxPool(),
    )  # fmt: skip
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(64 * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes + 1),
        min_size=min_size,
        max_size=max_size,
        box_batch_size_per_image=roi_batch,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=300,
    )


def evaluate(model: FasterRCNN, data: Path, split: str) -> dict[str, float]:
    dataset = DetectionDataset(data, split, train=False)
    label_to_id = {c["label"]: c["id"] for c in read_categories(data)}
    results = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(dataset), 4):
            items = [dataset[j] for j in range(i, min(i + 4, len(dataset)))]
            outputs = model([to_model_input(image, torch.device("cpu")) for image, _ in items])
            for (_, target), out in zip(items, outputs, strict=True):  # boxes in original pixels
                for (x1, y1, x2, y2), score, label in zip(
                    out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
                ):
                    box = [x1, y1, x2 - x1, y2 - y1]
                    results.append(
                        {
                            "image_id": target["image_id"],
                            "category_id": label_to_id[label],
                            "bbox": box,
                            "score": score,
                        }
                    )
    if not results:
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(dataset.annotation_file)
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluator.stats[:6].tolist(), strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="data: and model: (min_size, max_size) sections")
    p.add_argument("--data", type=Path, help="a preprocessed folder (default: build the synthetic default)")
    p.add_argument("--iterations", type=int, default=870)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=50, help="steps of linear lr warm-up")
    p.add_argument(
        "--grad-clip", type=float, help="clip the gradients' global L2 norm to this (default: none)"
    )
    p.add_argument("--roi-batch", type=int, default=64, help="RoIs sampled per image for the box head")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="the weights' initialisation and the batch order")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    params = load_params(args.params)
    print(time.strftime("date: %Y-%m-%d %H:%M UTC", time.gmtime()))
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_description("cpu").items()))
    with tempfile.TemporaryDirectory(prefix="learnability-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "pre"
            generate_synthetic(params.data, Path(tmp) / "coco", progress=False)
            preprocess_dataset(
                Path(tmp) / "coco", data, splits=(params.data.train_split, params.data.val_split),
                cfg=params.preprocess, progress=False,
            )  # fmt: skip
        dataset = DetectionDataset(data, params.data.train_split, train=True)
        model = build_model(
            len(read_categories(data)), params.model.min_size, params.model.max_size, args.roi_batch
        )
        sampler = GroupedBatchSampler(dataset, args.batch_size, shuffle=True, seed=args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        milestones = [int(args.iterations * 0.75), int(args.iterations * 0.9)]
        step, epoch, start = 0, 0, time.perf_counter()
        model.train()
        while step < args.iterations and time.perf_counter() - start < args.minutes * 60:
            sampler.set_epoch(epoch)
            for images, targets in loader:
                warmup = min(1.0, 0.001 + step / max(args.warmup, 1))
                decay = 0.1 ** sum(step >= m for m in milestones)
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * warmup * decay
                inputs = [to_model_input(image, torch.device("cpu")) for image in images]
                losses = model(inputs, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise SystemExit(f"step {step}: non-finite loss {losses}")
                optimizer.zero_grad()
                loss.backward()
                if args.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                step += 1
                if step % args.log_every == 0:
                    elapsed = time.perf_counter() - start
                    print(
                        f"step {step} loss {loss.item():.3f} {step * args.batch_size / elapsed:.2f} img/s",
                        flush=True,
                    )
                if step >= args.iterations or time.perf_counter() - start >= args.minutes * 60:
                    break
            epoch += 1
        minutes = (time.perf_counter() - start) / 60
        metrics = evaluate(model, data, params.data.val_split)
        print(f"trained {step} steps (batch {args.batch_size}) in {minutes:.1f} min")
        print(json.dumps({k: round(v, 3) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
