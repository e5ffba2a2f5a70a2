#!/usr/bin/env python
"""Describe neurons in words: ``python dissect.py describe --checkpoint RUN/checkpoints/last.ckpt --layers '[layer3, fc]'``."""
from lwta_vision.dissect_cli import main

if __name__ == "__main__":
    main()
