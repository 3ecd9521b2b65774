"""Convert a benchmark (or generated scenes) into verified Parquet shards.

    python jobs/prepare_data.py --dataset nyuv2 --root data/nyuv2 --out shards/nyuv2
    python jobs/prepare_data.py --dataset scenes --out shards/scenes --scenes-train 200

Re-running with the same input and options changes nothing. Bad input prints one line
``error: ...`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import _bootstrap  # noqa: F401  (puts platform/ on sys.path when mtsam is not installed)
from mtsam.data import DATASET_TASKS, DatasetError, SplitSource, open_dataset, write_shards
from mtsam.data.scenes import generate_scenes, scenes_key
from mtsam.data.shards import dataset_fingerprint, source_fingerprint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASET_TASKS))
    p.add_argument("--root", type=Path, help="dataset folder (scenes: where to keep them)")
    p.add_argument("--out", type=Path, required=True, help="shard folder to write")
    p.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="splits to convert (train val)"
    )
    p.add_argument(
        "--samples-per-shard", type=int, default=64, help="samples per Parquet file (64)"
    )
    p.add_argument("--num-classes", type=int, help="semantic classes (default: the benchmark's)")
    p.add_argument("--tasks", nargs="+", help="tasks to store (default: all of the dataset's)")
    g = p.add_argument_group("generated scenes (--dataset scenes)")
    g.add_argument("--scenes-train", type=int, default=200, help="training scenes (200)")
    g.add_argument("--scenes-val", type=int, default=50, help="validation scenes (50)")
    g.add_argument("--height", type=int, default=96, help="image height in pixels (96)")
    g.add_argument("--width", type=int, default=128, help="image width in pixels (128)")
    g.add_argument("--seed", type=int, default=0, help="scene generator seed (0)")
    args = p.parse_args(argv)
    if args.dataset != "scenes" and args.root is None:
        p.error(f"--root is required for --dataset {args.dataset}")
    return args


def _scene_sources(args: argparse.Namespace, stack: ExitStack) -> dict[str, SplitSource]:
    """Scenes are fingerprinted by their parameters, and generated only if a split is stale.

    Splits and tasks are checked first: an error must not name a temporary folder that is
    gone by the time it is printed, nor come after generating every scene.
    """
    bad = [s for s in args.splits if s not in ("train", "val")]
    if bad:
        raise DatasetError(f"--splits {bad}: generated scenes have the splits train and val")
    unknown = [t for t in args.tasks or () if t not in DATASET_TASKS["scenes"]]
    if unknown:
        raise DatasetError(
            f"--tasks {unknown}: generated scenes have the tasks {list(DATASET_TASKS['scenes'])}"
        )
    params = {
        "num_train": args.scenes_train,
        "num_val": args.scenes_val,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "num_classes": 6 if args.num_classes is None else args.num_classes,
    }
    key = scenes_key(**params)
    made: list[Path] = []

    def scenes_root() -> Path:
        if not made:
            root = args.root or Path(stack.enter_context(tempfile.TemporaryDirectory())) / "s"
            print(f"generating scenes in {root}", flush=True)
            made.append(generate_scenes(root, **params).root)
        return made[0]

    def opener(split: str):
        return lambda: open_dataset("scenes", scenes_root(), split, tasks=args.tasks)

    return {
        split: SplitSource(
            fingerprint=source_fingerprint(
                {"scenes": key, "split": split, "tasks": args.tasks}, []
            ),
            open=opener(split),
        )
        for split in args.splits
    }


def _reader_sources(args: argparse.Namespace) -> dict[str, SplitSource]:
    sources = {}
    for split in args.splits:
        ds = open_dataset(
            args.dataset, args.root, split, tasks=args.tasks, num_classes=args.num_classes
        )
        sources[split] = SplitSource(fingerprint=dataset_fingerprint(ds), open=lambda ds=ds: ds)
    return sources


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with ExitStack() as stack:
            if args.dataset == "scenes":
                sources = _scene_sources(args, stack)
            else:
                sources = _reader_sources(args)
            manifest = write_shards(
                args.out,
                sources,
                dataset=args.dataset,
                samples_per_shard=args.samples_per_shard,
                progress=lambda line: print(line, flush=True),
            )
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s}: {e['num_samples']}" for s, e in manifest["splits"].items())
    print(f"shards of {args.dataset} ({counts}; tasks {manifest['tasks']}) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
