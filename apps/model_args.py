"""The arguments of `gpuwatch model` (kept apart so that building the command line imports nothing heavy)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The `gpuwatch model` subcommands and their options."""
    sub = p.add_subparsers(dest="model_command", required=True)
    q = sub.add_parser("status", help="champion, challenger, since when, and the models the newest records name")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q = sub.add_parser("shadow", help="score ARTIFACT beside the champion in every stream worker, acting on nothing")
    q.add_argument("artifact", help="a model artifact (.pt) `gpuwatch train` wrote")
    q.add_argument("--note", default="", help="who and why, kept in the control message")
    for name, text in (("promote", "make the challenger the champion in every running worker (no restart)"),
                       ("rollback", "undo the last promote"), ("stop", "stop scoring the challenger")):  # fmt: skip
        q = sub.add_parser(name, help=text)
        q.add_argument("--note", default="", help="who and why, kept in the control message")
    q = sub.add_parser("compare", help="eval's figures for champion and challenger on the labels since it started")
    q.add_argument("--labels", default="", metavar="LABELS.jsonl", help="failure labels (default: the archive's)")
    q.add_argument("--archive", default="", help="archive whose label store to read (default: archive_url)")
    q.add_argument("--since", type=float, default=None, metavar="TS",
                   help="compare records from this unix time (default: when the challenger started)")
    q.add_argument("--merge-gap", type=float, default=600.0, help="alarms closer than this are one episode (s)")
    q.add_argument("--json", default="", help="also write the report here")
