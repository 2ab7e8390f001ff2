"""Train the flow shapes world's tiny SD3-type model from scratch (deterministic) and save it.

    python scripts/build_flow_world.py                 # writes worlds/shapes-flow/ (the committed folder)
    python scripts/build_flow_world.py --out /tmp/fw --steps 300 --eval-seeds 0   # a quick one

Same seed, same thread count, same torch version → the same weights. See inpo_pipeline/worlds/shapes_flow.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inpo_pipeline.reporting import Reporter  # noqa: E402
from inpo_pipeline.worlds.shapes_flow import DEFAULT_FLOW_WORLD, FlowWorldConfig, build_flow_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_FLOW_WORLD)
    for field in dataclasses.fields(FlowWorldConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    config = FlowWorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FlowWorldConfig)})
    reporter = Reporter()
    record = build_flow_world(args.out, config, reporter.progress)
    reporter.line(json.dumps(record["timings"]))
    reporter.line(json.dumps(record.get("base_quality", {})))
    reporter.line(f"flow world model written to {args.out}")


if __name__ == "__main__":
    main()
