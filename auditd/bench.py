"""`auditd bench`: placeholder until the load generator lands."""

from __future__ import annotations

import argparse

from auditd.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", action="store_true")


def main(args: argparse.Namespace, config: Config) -> int:
    raise NotImplementedError
