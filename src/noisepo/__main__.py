"""`python -m noisepo` (what `accelerate launch -m noisepo` runs)."""
import sys

from noisepo.cli import main

sys.exit(main())
