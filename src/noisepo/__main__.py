"""`python -m noisepo` (what `accelerate launch -m noisepo` runs)."""
import sys

from noisepo.cli import main
from noisepo.distributed import relaunch_accelerate_cpu

# `accelerate launch --cpu --num_processes N` starts one process: start the N (docs/distributed.md).
status = relaunch_accelerate_cpu(sys.argv[1:])
sys.exit(main() if status is None else status)
