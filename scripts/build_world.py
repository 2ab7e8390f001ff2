"""Train the shapes world's tiny SD1.5-type model from scratch (deterministic) and save it.

    python scripts/build_world.py                 # writes worlds/shapes/ (the committed folder)
    python scripts/build_world.py --out /tmp/w --unet-steps 200   # a quick, smaller one

Same seed, same thread count, same torch version → the same weights. See inpo_pipeline/worlds/shapes.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpo_pipeline.reporting import Reporter  # noqa: E402
from inpo_pipeline.worlds.shapes import DEFAULT_WORLD, WorldConfig, build_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_WORLD)
    for field in dataclasses.fields(WorldConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    config = WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})
    reporter = Reporter()
    record = build_world(args.out, config, reporter.progress)
    reporter.line(json.dumps(record["timings"]))
    reporter.line(f"world model written to {args.out}")


if __name__ == "__main__":
    main()
