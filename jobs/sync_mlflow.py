"""Upload MLflow spools left by runs whose tracking server was unreachable.

    python jobs/sync_mlflow.py --spool outputs/my-sweep [--tracking-uri http://host:5000]

``--spool`` is a run folder holding ``mlflow_spool.jsonl``, the file itself, or any folder
above (every spool under it is synced). Each spool goes to the tracking URI recorded in it
unless ``--tracking-uri`` is given. Safe to re-run: delivered entries are removed. Exit status
0 when everything was delivered, 1 when something is left (or was refused), 2 on bad input
(a malformed spool: the others are synced all the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (makes mtsam importable from a checkout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spool", required=True, help="run folder, spool file or folder above")
    ap.add_argument("--tracking-uri", default=None, help="override the URI recorded in a spool")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per MLflow request")
    args = ap.parse_args(argv)
    if not args.timeout > 0:  # also refuses nan
        ap.error(f"--timeout {args.timeout}: expected a number of seconds > 0")

    from mtsam.tracking.sync import sync_spool
    from mtsam.tracking.uri import TrackingError, check_tracking_uri

    try:
        if not Path(args.spool).exists():
            raise FileNotFoundError(f"--spool {args.spool}: no such spool folder or file")
        if args.tracking_uri is not None:
            try:
                check_tracking_uri(args.tracking_uri, timeout_s=min(10.0, args.timeout))
            except TrackingError as e:
                raise TrackingError(f"--tracking-uri: {e}") from None
        results = sync_spool(
            args.spool, tracking_uri=args.tracking_uri, request_timeout_s=args.timeout
        )
    except (FileNotFoundError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"nothing to sync under {args.spool}")
        return 0
    ok = True
    for r in results:
        if r.error:
            continue
        if r.report is None:
            ok = False
            print(f"{r.spool_path}: {r.note}")
            continue
        ok &= r.report.complete
        print(f"{r.spool_path}: {r.report.summary()}")
    # Said last, so that the last line names a spool that could not be read.
    errors = [r.error for r in results if r.error]
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 2 if errors else 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
