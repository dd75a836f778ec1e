"""Forward-only (inference, no grad) seconds for a batch of 4 samples of 3 x 288 x 224: synth7t vs MONAI.

Same networks (ours, light, MONAI as the thesis ran it, MONAI tuned), subprocess isolation and options as
``train_step.py`` (see there); both MONAI modes always run (``--monai-tuned`` is still accepted and ignored):

    python benchmarks/predict_forward.py [--quick] [--device cuda] [--omp-passive]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import main  # noqa: E402

if __name__ == "__main__":
    main(what="predict")
