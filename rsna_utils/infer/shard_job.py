"""One shard of `predict --shards N` (`rsna_utils.infer.shard`), run as
`python -m rsna_utils.infer.shard_job JOB.json`: the images of the shard's CSV scored as the
one-process run scores them (`predict.score_images`), the per-image table written for the
parent to merge. Apart from `shard` so that predict -> shard -> predict is no import circle."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rsna_utils.core.errors import RsnaError, write_atomic


def run_job(path: str | Path) -> None:
    """One shard: score the images of its CSV as `predict` does, write the per-image table."""
    from rsna_utils.infer.predict import PredictConfig, load_ensemble, score_images
    from rsna_utils.learn.png_table import load_table
    from rsna_utils.learn.device import resolve_device
    job = json.loads(Path(path).read_text())
    cfg = PredictConfig(**job["config"])
    dev = resolve_device(cfg.device)
    df = load_table(cfg.csv)
    imgs = score_images(cfg, df, load_ensemble(cfg, dev))     # as predict does
    write_atomic(Path(job["result"]), lambda tmp: imgs.to_pickle(tmp))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m rsna_utils.infer.shard_job JOB.json (written by predict --shards)",
              file=sys.stderr)
        return 2
    from rsna_utils.core.warn import plain_warnings
    plain_warnings("predict")
    try:
        run_job(argv[0])
    except RsnaError as e:
        print(f"rsna predict (shard): error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
