"""Convert a benchmark (or generated scenes) into verified Parquet shards.

    python jobs/prepare_data.py --dataset nyuv2 --root data/nyuv2 --out shards/nyuv2
    python jobs/prepare_data.py --dataset scenes --out shards/scenes --scenes-train 200
    python jobs/prepare_data.py --verify s3://bucket/shards/nyuv2

Re-running with the same input and options changes nothing. ``--verify ROOT`` checks an
existing shard set (a folder or an s3:// / gs:// URI) in full: the manifest, every shard's
size and Parquet footer, and the sha256 of every byte (training workers check all but the
sha256, which would read the whole set at every start). Bad input prints one line
``error: ...`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import _bootstrap  # noqa: F401  (puts platform/ on sys.path when mtsam is not installed)
from mtsam.data import (
    DATASET_TASKS,
    DatasetError,
    SplitSource,
    load_manifest,
    open_dataset,
    write_shards,
)
from mtsam.data.scenes import (
    find_scene_sets,
    generate_scenes,
    is_generated,
    read_scene_params,
    scenes_key,
)
from mtsam.data.shards import dataset_fingerprint, source_fingerprint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASET_TASKS))
    p.add_argument("--root", type=Path, help="dataset folder (scenes: where to keep them)")
    p.add_argument("--out", type=Path, help="shard folder to write")
    p.add_argument(
        "--verify",
        metavar="SHARDS",
        help="only check this shard set (folder or URI) in full, sha256 included",
    )
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
    if args.verify is not None:
        return args
    if args.dataset is None or args.out is None:
        p.error("--dataset and --out are required (or --verify SHARDS)")
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
            if args.root is None:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "s"
                print(f"generating scenes in {root}", flush=True)
            else:
                root = args.root
                _check_scenes_root(root, params)
                if is_generated(root, **params):
                    print(f"reusing scenes in {root}", flush=True)
                elif read_scene_params(root) is not None:
                    print(
                        f"generating scenes in {root} (replacing other options' scenes)", flush=True
                    )
                else:
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


_SCENE_OPTIONS = {
    "num_train": "--scenes-train",
    "num_val": "--scenes-val",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "num_classes": "--num-classes",
}


def _check_scenes_root(root: Path, params: dict[str, int]) -> None:
    """``--root`` must be a generated-scenes folder, or new, or empty. A folder that only
    holds generated scenes further down (e.g. ``outputs/cache``, where runs keep them in
    ``scenes/scenes-<key>``) is refused with their names; none is picked silently."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--root {root}: exists and is not a folder")
    if not root.exists() or read_scene_params(root) is not None or not any(root.iterdir()):
        return
    found = find_scene_sets(root)
    if not found:
        raise DatasetError(
            f"--root {root}: exists and is not a generated-scenes folder (nor holds one); "
            "pass a new or empty folder, or one generated before"
        )
    same = [f for f in found if is_generated(f, **params)]

    def listed(folders: list[Path], with_options: bool) -> str:
        shown = [
            f"{f} ({_scene_options(read_scene_params(f) or {})})" if with_options else str(f)
            for f in folders[:4]
        ]
        more = f" and {len(folders) - 4} more" if len(folders) > 4 else ""
        return ", ".join(shown) + more

    where = f"--root {root}: not a generated-scenes folder; it holds"
    others = len(found) - len(same)
    if len(same) == 1:
        besides = f" (and {others} made with other options)" if others else ""
        hint = f"{same[0]}, made with these options{besides}; pass that as --root"
    elif same:
        hint = (
            f"{len(same)} generated-scenes folders made with these options: "
            f"{listed(same, False)}; pass one of them as --root"
        )
    elif len(found) == 1:
        hint = (
            f"{listed(found, True)}, made with other options; pass that as --root "
            "with those options"
        )
    else:
        hint = (
            f"{len(found)} generated-scenes folders, none made with these options: "
            f"{listed(found, True)}; pass one of them as --root with its options"
        )
    raise DatasetError(f"{where} {hint}")


def _scene_options(params: dict[str, object]) -> str:
    """The prepare_data options that generate scenes with ``params``."""
    return " ".join(f"{flag} {params[k]}" for k, flag in _SCENE_OPTIONS.items() if k in params)


def _reader_sources(args: argparse.Namespace) -> dict[str, SplitSource]:
    sources = {}
    for split in args.splits:
        ds = open_dataset(
            args.dataset, args.root, split, tasks=args.tasks, num_classes=args.num_classes
        )
        sources[split] = SplitSource(fingerprint=dataset_fingerprint(ds), open=lambda ds=ds: ds)
    return sources


def verify(root: str) -> str:
    """Check the shard set at ``root`` in full; returns a one-line summary."""
    manifest = load_manifest(root, verify=True)
    counts = ", ".join(
        f"{s}: {e['num_samples']} samples in {len(e['shards'])} shards"
        for s, e in manifest["splits"].items()
    )
    return f"verified {root} ({manifest['dataset']}; {counts}): sizes, footers and sha256 match"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        try:
            print(verify(args.verify))
        except DatasetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
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
