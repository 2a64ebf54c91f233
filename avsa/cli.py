"""The `avsa` command. Subcommands import their module lazily so `avsa --help` stays instant.

Config-driven subcommands (`pretrain`, `sweep`, `transfer`, `config`) take Hydra overrides
(`data.num_viewpoints=8 experiment=demo_local`); the others take ordinary flags.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys

from avsa.errors import AvsaError
from avsa.tracking.code_version import ENTRY_ENV
from avsa.train import interrupt

# name -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("avsa.synth_cli", "make a synthetic 360° data set (MP4 + ambiX audio, labels, masks)"),
    "inspect": ("avsa.inspect", "stream facts of a 360° clip and where its sound comes from"),
    "shard": ("avsa.data.shard_cli", "validate clips and write tar shards + manifest (local or s3://)"),
    "config": ("avsa.cli", "print the composed, validated config for some overrides"),
    "pretrain": ("avsa.train.driver", "pretrain with Ray Train (AVSA, AVC or AVTS) [overrides]"),
    "sweep": ("avsa.sweep.driver", "Ray Tune sweep over config keys, tracked in MLflow [overrides]"),
    "transfer": ("avsa.downstream.run", "downstream transfer TASK pretrain=RUN|URI|scratch"),
    "compare": ("avsa.downstream.compare", "paper-style table of transfer results from MLflow"),
    "submit": ("avsa.cluster", "print a KubeRay RayJob sized by flags, for kubectl create -f -"),
    "reproduce": ("avsa.reproduce", "the paper's tables regenerated on synthetic scenes"),
    "demo": ("avsa.demo", "synthesise, shard, pretrain, transfer: the whole loop on one machine"),
}

OVERRIDE_COMMANDS = ("config", "pretrain", "sweep", "transfer")  # args are Hydra overrides


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: avsa COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`avsa COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def config_main(argv: list[str]) -> int:
    """`avsa config [overrides]`: print the resolved config as YAML."""
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: avsa config [hydra overrides...]")
        return 0
    from omegaconf import OmegaConf

    from avsa.config import compose
    from avsa.tracking import redact

    cfg = compose(argv)
    print(redact(OmegaConf.to_yaml(OmegaConf.structured(cfg))), end="")
    print(f"# run name: {cfg.run_name()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in OVERRIDE_COMMANDS and {"-h", "--help"} & set(rest):  # after overrides too
        rest = ["--help"]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        print(f"avsa: error: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault(ENTRY_ENV, f"avsa {name}")  # the MLflow source tag, Ray workers too
    # MLflow draws a bar for every artifact download (a model's registration, each run's
    # examples in `compare`): noise in a terminal, worse in a log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        # SIGTERM (`kill`, `ray job stop`, a pod's deletion) stops every command as Ctrl-C
        # does: an MLflow run in progress ends KILLED, never left RUNNING.
        with interrupt.signals_raise():
            if name == "config":
                return config_main(rest)
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.main(rest) or 0)
    except AvsaError as e:
        print(f"avsa {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as k:
        e = interrupt.as_interrupted(k)
        print(f"avsa {name}: stopped by {e.name}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
