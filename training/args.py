"""Command-line arguments of `gpuwatch train`, `score` and `eval` (argparse only, so the CLI starts fast)."""

from __future__ import annotations

import argparse


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", action="append", default=[], help="a `gpuwatch simulate` output dir, or a `gpuwatch archive` "
        "location whose label store holds its labels (repeatable; required unless --operating-point-of)",
    )
    p.add_argument(
        "--operating-point-of", default="", metavar="MODEL.pt",
        help="do not train: take this artifact (and the GBDT baseline next to it, if any), choose only its "
        "operating point (threshold, alarm persistence) on --val-data, and write it to --out",
    )
    p.add_argument(
        "--val-data",
        action="append",
        default=[],
        help="a separately simulated validation fleet (repeatable: the fleets are pooled): the alarm's operating "
        "point (threshold, seconds held) is the highest recall within the service levels there, the drain's the "
        "most net GPU-hours at the real failure rate (docs/model.md); without it, the best sequence-level F1 on "
        "a held-back GPU split",
    )
    p.add_argument(
        "--out", required=True, help="artifact path (.pt); the GBDT baseline goes next to it (.gbdt.txt)"
    )
    p.add_argument(
        "--archive", default="", metavar="URL_OR_DIR",
        help="retrain on this fleet's own archive (docs/model.md, 'Retraining on your fleet'): train on its past, "
        "choose calibration and operating points on its last --validate-days; instead of --data and --val-data",
    )
    p.add_argument("--labels", default="", metavar="LABELS.jsonl",
                   help="with --archive: failure labels from this file instead of the archive's label store")
    p.add_argument(
        "--init", default="shipped", metavar="{shipped,PATH,scratch}",
        help="with --archive: fine-tune the shipped model (default) or the artifact at PATH, or train anew (scratch)",
    )
    p.add_argument("--validate-days", type=float, default=7.0,
                   help="with --archive: the most recent days, held out to validate on (default 7)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default 6; 3 when fine-tuning with --archive)")
    p.add_argument("--hidden", type=int, default=32, help="LSTM hidden size")
    p.add_argument("--mlp", type=int, default=32, help="width of the MLP after the LSTM")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 3e-3; 3e-4 when fine-tuning with --archive)")
    p.add_argument(
        "--sample-every", type=float, default=30.0, help="seconds between training sequences per GPU"
    )
    p.add_argument(
        "--negative-keep",
        type=float,
        default=0.1,
        help="share of quiet negative sequences kept (alerting-looking negatives are all kept)",
    )
    p.add_argument("--horizon", type=float, default=3600.0, help="prediction horizon in seconds")
    p.add_argument("--no-gbdt", action="store_true", help="do not train the GBDT baseline")
    p.add_argument(
        "--rescore-interval", type=float, default=5.0, help="scoring cadence on the validation fleet"
    )
    p.add_argument(
        "--merge-gap", type=float, default=600.0, help="alarms closer than this form one episode (s)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the weights' initialisation and the batch order"
    )
    p.add_argument(
        "--data-seed", type=int, default=None,
        help="seed of the negative sampling and of the held-back GPU split (default: --seed), so models with "
        "different --seed can be trained on the very same sequences",
    )  # fmt: skip


def add_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL of gpuwatch.samples/1 snapshots, time-ordered, or a "
                   "`gpuwatch archive` location (folder or URL)")
    p.add_argument("--output", required=True, help="where the gpuwatch.risk/1 records go (JSONL)")
    p.add_argument(
        "--actions", default="", metavar="PATH",
        help="also replay the remediation policy (the settings' rules) on the records, on the recording's clock, "
        "and write the gpuwatch.remediation/1 events it would have emitted here (JSONL)",
    )  # fmt: skip
    p.add_argument("--model", default="", help="model artifact (default: the one shipped in the package)")
    p.add_argument(
        "--rescore-interval", type=float, default=5.0, help="seconds of sample time between scorings"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--json", default="", help="also write the throughput summary here")
    p.add_argument(
        "--workers", type=int, default=0, metavar="N",
        help="scoring processes, each owning a share of the hosts; the output is the same as with one, "
        "wall times aside (default 0: one per CPU; 1: score in this process)",
    )  # fmt: skip


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="held-out `gpuwatch simulate` output dir with samples.jsonl + labels.jsonl, or a `gpuwatch archive` "
        "location with labels in its label store (repeatable)",
    )
    p.add_argument("--model", default="", help="model artifact (default: the one shipped in the package)")
    p.add_argument(
        "--gbdt", default="", help="GBDT baseline written by `gpuwatch train` (default: next to --model)"
    )
    p.add_argument("--json", default="", help="write the report here")
    p.add_argument(
        "--report", default="", metavar="PATH.html",
        help="also write an HTML page: reliability diagrams and what each replayed policy did (needs matplotlib)",
    )
    p.add_argument(
        "--rescore-interval", type=float, default=5.0, help="seconds of sample time between scorings"
    )
    p.add_argument(
        "--merge-gap", type=float, default=600.0, help="alarms closer than this form one episode (s)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def _add_site_args(p: argparse.ArgumentParser) -> None:
    """How a site builds its sequences and the model's shape: the same flags and defaults as `gpuwatch train`."""
    p.add_argument("--hidden", type=int, default=32, help="LSTM hidden size (every site and the coordinator alike)")
    p.add_argument("--mlp", type=int, default=32, help="width of the MLP after the LSTM")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sample-every", type=float, default=30.0, help="seconds between training sequences per GPU")
    p.add_argument("--negative-keep", type=float, default=0.1, help="share of quiet negative sequences kept")
    p.add_argument("--horizon", type=float, default=3600.0, help="prediction horizon in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the negative sampling and each site's held-back GPU split (default: --seed)")  # fmt: skip


def _add_coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=6, help="training rounds (after the round that pools the normalisation)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs each site trains per round")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of round 1, cosine-decayed to 0.1 of it")
    p.add_argument(
        "--val-data", action="append", default=[], required=True,
        help="the coordinator's own validation recording (repeatable; pooled): the calibration map and operating "
        "points are chosen there, as `gpuwatch train --val-data` does; never a site's data",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="where the federated model artifact (.pt) goes")
    p.add_argument("--rescore-interval", type=float, default=5.0, help="scoring cadence on the validation data")
    p.add_argument("--merge-gap", type=float, default=600.0, help="alarms closer than this form one episode (s)")


def add_federated_args(p: argparse.ArgumentParser) -> None:
    """`gpuwatch federated serve|join|simulate` (docs/federated.md)."""
    sub = p.add_subparsers(dest="federated_command", required=True)
    q = sub.add_parser("serve", help="the coordinator: FedAvg over the sites that join, then the federated artifact")
    q.add_argument("--address", default="127.0.0.1:9093",
                   help="HOST:PORT the coordinator listens on (plain gRPC: loopback unless you name a trusted network's)")
    q.add_argument("--sites", type=int, required=True, help="how many sites take part (each round waits for all)")
    _add_coordinator_args(q)
    _add_site_args(q)
    q = sub.add_parser("join", help="a site: train on its own data, send only weights to the coordinator")
    q.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    q.add_argument("--data", action="append", required=True,
                   help="this site's `gpuwatch simulate` folder or `gpuwatch archive` location (repeatable)")  # fmt: skip
    q.add_argument("--name", default="", help="the site's name in logs (default: its data folder's)")
    _add_site_args(q)
    q = sub.add_parser("simulate", help="the coordinator here and one site process per --sites entry, on loopback")
    q.add_argument("--sites", required=True, help="the sites' recordings or archives, comma-separated (at least two)")
    q.add_argument("--port", type=int, default=0, help="loopback port of the coordinator (default: a free one)")
    _add_coordinator_args(q)
    _add_site_args(q)
