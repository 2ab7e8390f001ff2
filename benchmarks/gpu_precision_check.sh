#!/usr/bin/env bash
# GPU check: step-0 agreement of `inpo invert --compute-dtype D` and `inpo train --mixed-precision P`
# on CUDA for both families, then fp16 sampling of the trained UNet. Results: docs/benchmarks.md.
set -e
python3 - <<'PY'
from pathlib import Path
from inpo_pipeline.worlds.example import build_tiny_sd15, build_tiny_sdxl, write_pickapic_parquet
build_tiny_sd15(Path('/tmp/m/sd15')); build_tiny_sdxl(Path('/tmp/m/sdxl'))
write_pickapic_parquet(Path('/tmp/d.parquet'), num_pairs=40, seed=0)
Path('/tmp/prompts.txt').write_text("a red circle\na cat\n")
PY
for fam in sd15 sdxl; do for prec in bf16:bfloat16 fp16:float16; do mp=${prec%%:*}; cd_=${prec##*:}
python3 -m inpo_pipeline invert --model /tmp/m/$fam --data /tmp/d.parquet --out /tmp/s-$fam-$mp.zarr --compute-dtype $cd_ --batch-size 16 >/dev/null 2>&1
python3 -m inpo_pipeline train --cache /tmp/s-$fam-$mp.zarr --out /tmp/r-$fam-$mp --steps 3 --batch-size 8 --grad-accum 1 --mixed-precision $mp --num-workers 2 --prompt-dropout 0.5 > /tmp/train.log 2>&1 || tail -5 /tmp/train.log
python3 -c "import json,math;l=[json.loads(x) for x in open('/tmp/r-$fam-$mp/metrics.jsonl')];print('$fam $mp step-0 loss-log2 =',l[0]['loss']-math.log(2),'margin',l[0]['margin'],'last loss',l[-1]['loss'])"
done; done
python3 -m inpo_pipeline sample --model /tmp/m/sd15 --unet /tmp/r-sd15-fp16/unet --prompts /tmp/prompts.txt --out /tmp/samp --seeds 2 --steps 4 --dtype float16 > /tmp/s.log 2>&1 || tail -5 /tmp/s.log
ls /tmp/samp; python3 -c "
from PIL import Image; import numpy as np, glob
for f in sorted(glob.glob('/tmp/samp/*.png'))[:4]: a=np.asarray(Image.open(f)); print(f, a.shape, a.mean().round(1), np.isfinite(a).all())"
