"""Train and evaluate DG-SCT on AVE: `python -m dgsct_kernels.train --task ave` under its
old name (every option is the same; see dgsct_kernels/train.py).

    python python/train_ave.py                         # tiny model, synthetic data, ~1 min
    python python/train_ave.py --data-root /data/AVE --preset paper \\
        --visual-weights swinv2_large.safetensors --audio-weights HTSAT_AudioSet.ckpt
    torchrun --standalone --nproc-per-node 2 python/train_ave.py   # DDP (gloo / nccl)
"""
import sys
import time

STARTED = time.time()  # before the slow imports (torch, timm): the whole run's clock

from dgsct_kernels import train  # noqa: E402


def parse_args(argv=None):
    return train.parse_args(argv, task="ave")


def main(argv=None, started=None) -> dict:
    return train.main(argv, started, task="ave")


if __name__ == "__main__":
    main(sys.argv[1:], started=STARTED)
