"""``python -m recalx_lightning fit --config configs/digits.yaml`` (see :mod:`recalx_lightning.lightning.cli`)."""

from recalx_lightning.lightning.cli import main

if __name__ == "__main__":
    main()
