#!/usr/bin/env python
"""Train a network: ``python train.py fit --config configs/quickstart.yaml`` (see README)."""
from lwta_vision.cli import main

if __name__ == "__main__":
    main()
