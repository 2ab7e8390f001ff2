# inpo task runner. `just --list` shows the recipes.

python := env_var_or_default("PYTHON", "python3")
venv := ".venv"
bin := venv / "bin"

# Create .venv and install inpo with its test tools (torch's CPU build first).
install:
    test -x {{bin}}/python || {{python}} -m venv {{venv}}
    {{bin}}/python -m pip install --quiet --upgrade pip
    {{bin}}/python -m pip install --quiet "torch==2.13.0"
    {{bin}}/python -m pip install --quiet -e ".[test,hub]"

# The whole story in the small world: base model -> preference data -> invert -> train -> sample -> score.
demo out="demo-output": install
    {{bin}}/inpo demo --out {{out}}

# The built-in example end to end: tiny model + generated Pick-a-Pic data -> invert -> train.
example out="example-output": install
    {{bin}}/inpo example --out {{out}}
    {{bin}}/inpo cache info {{out}}/store-sd15.zarr

# The test suite (what CI runs).
test *args: install
    {{bin}}/python -m pytest {{args}}

# Tests marked slow (the reduced demos, every reward kind, the reduced experiment sweeps), kept out of the default suite; CI runs them too.
test-slow *args: install
    {{bin}}/python -m pytest -m slow {{args}}

# docs/experiments.md's sweeps in the shapes world (mirror protocol, 3 seeds; about an hour or two on 2 cores).
experiments out="experiments-output" *args: install
    OMP_NUM_THREADS=2 {{bin}}/python scripts/experiments.py --out {{out}} --docs docs {{args}}

# Stage-one benchmark on a small UNet config (writes a JSON report to stdout).
bench-invert *args: install
    {{bin}}/python benchmarks/bench_invert.py {{args}}

# Stage-two benchmark: cached vs online vs Diffusion-DPO vs floor (JSON report to stdout).
bench-train *args: install
    {{bin}}/python benchmarks/bench_train.py {{args}}

# Stage two's read path: loader rows/s and MB/s against a numpy memmap of the same bytes (JSON to stdout).
bench-loader *args: install
    OMP_NUM_THREADS=1 {{bin}}/python benchmarks/bench_loader.py {{args}}
