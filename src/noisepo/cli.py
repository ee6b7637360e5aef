"""`noisepo <command>`: a plain table of command name -> (config dataclass, function).

Both are named by import path and loaded only when the command runs (or its `--help` is asked
for), so `noisepo --help` does not import torch. A `NoisepoError` (bad input or config) becomes one
line on stderr and exit status 2, and so does an OSError of a full disk or a place that cannot be
written (`STORAGE_ERRORS`), or a checkpoint file torch's `weights_only` loader refuses; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass

from noisepo import __version__
from noisepo.errors import NoisepoError


@dataclass(frozen=True)
class Command:
    config: str  # "module:ConfigClass"
    run: str  # "module:function" taking the config, returning an exit status or None
    summary: str


# Group "data" holds sub-commands: `noisepo data corrupt ...`.
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "sft": Command("noisepo.training.config:SFTConfig", "noisepo.training.sft:run_sft",
                   "Supervised fine-tuning (loss on response tokens only) + greedy exact-match eval."),
    "train": Command("noisepo.training.config:TrainConfig", "noisepo.training.preference:run_train",
                     "Preference training with one loss (dpo, cdpo, rdpo, ipo, hinge, ropo)."),
    "generate": Command("noisepo.generation.config:GenerateConfig", "noisepo.generation.command:run_generate",
                        "Generate responses for a prompt file (batched, resumable)."),
    "score": Command("noisepo.judges.config:ScoreConfig", "noisepo.judges.command:run_score",
                     "Score the chosen and rejected responses of preference pairs with a scorer."),
    "serve": Command("noisepo.serve:ServeConfig", "noisepo.serve:run_serve",
                     "Serve a local model over an OpenAI-compatible chat API (extra 'serve')."),
    "spin": Command("noisepo.pipelines.dnpo_config:SPINConfig", "noisepo.pipelines.dnpo:run_spin",
                    "SPIN self-play iterations (DNPO with Dynamic Sample Labeling and NPO off)."),
    "dnpo": Command("noisepo.pipelines.dnpo_config:DNPOConfig", "noisepo.pipelines.dnpo:run_dnpo",
                    "DNPO: SPIN iteration 0, then iterations with Dynamic Sample Labeling and NPO."),
    "ropo": Command("noisepo.pipelines.ropo_config:ROPOConfig", "noisepo.pipelines.ropo:run_ropo",
                    "ROPO rounds: robust loss, noise filtering, rejection-sampling refills."),
    "demo": Command("noisepo.demo:DemoConfig", "noisepo.demo:run_demo",
                    "Run the embedded default end to end on the built-in task with a tiny model."),
    "report": Command("noisepo.report:ReportConfig", "noisepo.report:run_report",
                      "Markdown report with tables and plots from finished dnpo/spin/ropo run folders."),
    "data": {
        "corrupt": Command("noisepo.data.config:CorruptConfig", "noisepo.data.noise:run_corrupt",
                           "Flip preference labels (symmetric or rule-based) and record label_flipped."),
        "make": Command("noisepo.tasks.config:MakeDataConfig", "noisepo.tasks.command:run_make_data",
                        "Write a built-in task's SFT data, prompts and test split as JSONL."),
    },
}

# Names reserved for the loops and reports that later work adds (see the issues).
PLANNED: list[str] = []


# A full disk, a quota, a file-size limit or a read-only / forbidden place: the user's to fix, so one
# line (exit 2) instead of a traceback. Artifacts are written atomically, so nothing half-written is
# left behind as if complete, and a rerun after freeing space resumes.
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(err: Exception) -> str | None:
    """The one-line message of a storage error (an OSError, or safetensors' error wrapping one), else None."""
    code, where, what = getattr(err, "errno", None), getattr(err, "filename", None), getattr(err, "strerror", None)
    if not isinstance(err, OSError) and type(err).__name__ == "SafetensorError":  # "... (os error 28)"
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
        what = os.strerror(code) if code else None
    if code not in STORAGE_ERRORS:
        return None
    return (f"{where + ': ' if where else ''}{what or err} (errno {errno.errorcode.get(code, code)}): free disk "
            "space, fix the permissions or choose another output, then rerun (finished stages are kept)")


def refused_pickle(err: Exception) -> str | None:
    """torch's `weights_only` loader refused a file (a checkpoint holding Python objects, maybe planted)."""
    if type(err).__name__ != "UnpicklingError":  # by name: this module loads no unpickler at all
        return None
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"refused to load a file that holds Python objects, not only tensors ({first}); noisepo never "
            "unpickles such files: use checkpoints it wrote, or start without --resume")


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _available(commands: dict) -> dict:
    """Drop commands whose module is not in this checkout yet (keeps `--help` honest)."""
    out = {}
    for name, entry in commands.items():
        if isinstance(entry, dict):
            sub = _available(entry)
            if sub:
                out[name] = sub
        else:
            try:
                found = importlib.util.find_spec(entry.run.partition(":")[0]) is not None
            except ModuleNotFoundError:
                found = False
            if found:
                out[name] = entry
    return out


def build_parser() -> argparse.ArgumentParser:
    from noisepo.config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="noisepo",
        description="Preference optimisation of language models under noisy preference signals: "
                    "DNPO, ROPO and the baselines DPO, cDPO, rDPO, IPO, hinge and SPIN.",
        epilog="Every command takes --config FILE.yaml; flags override it. "
               "`noisepo COMMAND --help` lists every option with its default.",
    )
    parser.add_argument("--version", action="version", version=f"noisepo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(sub, name: str, entry: Command):
        cmd = sub.add_parser(name, help=entry.summary, description=entry.summary)
        add_config_arguments(cmd, _load(entry.config))
        cmd.set_defaults(_handler=entry)

    for name, entry in _available(COMMANDS).items():
        if isinstance(entry, dict):
            group = subparsers.add_parser(name, help=f"{name} tools: " + ", ".join(entry),
                                          description=f"{name} tools")
            group_sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            for sub_name, sub_entry in entry.items():
                add(group_sub, sub_name, sub_entry)
            group.set_defaults(_group=group)
        else:
            add(subparsers, name, entry)
    return parser


def main(argv: list[str] | None = None) -> int:
    from noisepo.config import config_from_namespace

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    entry = getattr(args, "_handler", None)
    if entry is None:
        group = getattr(args, "_group", None)
        (group or parser).print_help()
        return 0 if args.command is None else 2
    name = " ".join(filter(None, [args.command, getattr(args, "subcommand", None)]))
    try:
        config = config_from_namespace(_load(entry.config), args)
        status = _load(entry.run)(config)
    except NoisepoError as err:
        print(f"noisepo {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        message = storage_error(err) or refused_pickle(err)
        if message is None:
            raise
        print(f"noisepo {name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noisepo {name}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
