#!/usr/bin/env python
"""Pretrain an Aquila / LLaMA model; `--help` for the options, no arguments for the tiny demo.

The run lives in aquila_fn.jobs.pretrain; this script only hands it the command line.
"""
import sys

from aquila_fn.jobs.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
