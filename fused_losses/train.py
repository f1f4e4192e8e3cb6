"""``python -m fused_losses.train ...`` (and under ``torchrun``): the trainer's command line."""
from fused_losses.trainer.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
