"""The `hybrids` command line.

    hybrids blocks                     list the registered blocks and their config fields
    hybrids layout "6M:A*" --depth 78  resolve a layout string, then account for a model built from it
    hybrids info zamba-7b              parameters, FLOPs per token and cache bytes of a recipe, YAML or layout
    hybrids info hf:bamba              the same for an HF family's default config, or an HF model directory
    hybrids data sample task=mqar n=8  write examples of a synthetic task to an .npz file and print a few
    hybrids eval run=runs/train/<name>  long-context probes (and lm-eval tasks) of a run or saved model
    hybrids profile llama-tiny mamba-tiny zamba-tiny --match zamba-tiny
                                       measured cache bytes and prefill / decode latency vs the accounting
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import yaml

import blocks
from hybrids import accounting, ui
from hybrids.layout import LayoutError, parse_layout


def _blocks(args) -> int:
    for entry in blocks.entries():
        names = [f.name for f in dataclasses.fields(entry.config_cls)]
        print(f"{entry.symbol:<3} {entry.name:<17} {entry.kind:<7} {entry.cls.__module__}.{entry.cls.__name__}")
        print(f"    config: {', '.join(names)}")
    return 0


def _stats(args, source: str, **fixed) -> accounting.Stats:
    overrides = {**dict(args.set), **{k: v for k, v in fixed.items() if v is not None}}
    return accounting.stats(source, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype, **overrides)


def _layout(args) -> int:
    layout = parse_layout(args.text, depth=args.depth)
    print(f"layout: {layout}")
    print(f"backbone layers: {layout.n_layers}, shared invocations: {len(layout.invocations)}")
    print(layout.describe())
    print()
    print(_stats(args, args.text, depth=args.depth, d_model=args.d_model).table())
    return 0


def _info(args) -> int:
    source = args.source
    if hf_source(source):
        from hybrids.hf.interop import config_from_source  # transformers only when an HF model is named

        source = config_from_source(source)
    print(_stats(args, source).table(layers=args.layers))
    return 0


def hf_source(source: str) -> bool:
    """An HF family ("hf:bamba") or a directory holding an HF config.json."""
    return source.startswith("hf:") or (Path(source) / "config.json").is_file()


def _assignment(text: str) -> tuple[str, object]:
    """'blocks.mamba.d_state=32' -> ("blocks.mamba.d_state", 32); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"value of {key.strip()!r} is not valid YAML: {value!r}") from err


def _accounting_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length of FLOPs and caches")
    parser.add_argument("--batch", type=int, default=1, help="sequences held in the caches")
    parser.add_argument("--dtype", default="bf16", choices=list(accounting.DTYPES), help="cache dtype")
    parser.add_argument("--set", type=_assignment, action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. blocks.mamba.d_state=32 (repeatable)")


def _train(args) -> int:
    from hybrids.training.config import compose, to_yaml

    config = compose(args.overrides)
    if args.cfg:
        print(to_yaml(config), end="")
        return 0
    from hybrids.training.run import train

    try:
        result = train(config)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1) after its clean-up
        print("hybrids: interrupted; the same command resumes the run from its last checkpoint: "
              f"hybrids train {shlex.join(args.overrides)}", file=sys.stderr)
        return 130
    summary = {k: round(v, 4) for k, v in sorted(result.metrics.items()) if k.startswith("val/")}
    print(f"run: {result.run_dir}  steps: {result.steps}  {summary}")
    if result.stop_reason:
        print(f"hybrids: stopped early: {result.stop_reason}", file=sys.stderr)
        return 1
    return 0


def _sweep(args) -> int:
    from search.objective import TrialInterrupted
    from search.runner import run_study
    from search.storage import shown
    from search.study_config import DEFAULT_STORAGE, load_study

    config, extra_train = load_study(args.overrides)
    print(f"study {config.name}: {config.n_trials} trials, {config.sampler} sampler, "
          f"storage {shown(config.resolved_storage())}")
    try:
        result = run_study(config, extra_train)
    except TrialInterrupted as err:
        print(f"hybrids: {err}: recorded as failed; run the same command again to resume it from its checkpoint",
              file=sys.stderr)
        return 130
    c, name = result["counts"], result["study"].name
    print(f"study {name}: {c['done']}/{config.n_trials} done ({c['complete']} complete, {c['pruned']} pruned, "
          f"{c['fail']} failed); recovered {result['recovered']}")
    store = result["storage"]
    print(f"next: hybrids report study={name}" + (f" storage={store}" if store != DEFAULT_STORAGE else ""))
    if result["status"] != "FINISHED":
        print(f"hybrids: error: the sweep ended {result['status']}: a worker stopped early (its error is above); "
              "finished trials are kept, run the same command again to go on", file=sys.stderr)
        return 1
    return 0


REPORT_OPTIONS = ("study", "storage", "out", "mlflow", "with")
REPORT_USAGE = "hybrids report study=<name> [with=<study>,...] [storage=URL] [out=DIR] [mlflow=false]"


def _report_options(options: list[str]) -> dict[str, str]:
    """key=value options of `hybrids report`; anything else is an error naming the valid keys."""
    opts = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in REPORT_OPTIONS:
            raise blocks.ConfigError(f"unknown report option {option!r}; usage: {REPORT_USAGE}")
        opts[key] = value
    if "study" not in opts:
        raise blocks.ConfigError(f"name the study: {REPORT_USAGE}")
    if opts.get("mlflow", "true").lower() not in ("true", "false"):
        raise blocks.ConfigError(f"mlflow must be true or false, got {opts['mlflow']!r}")
    return opts


def _report(args) -> int:
    from analysis import DEFAULT_STORAGE, write_report

    opts = _report_options(args.options)
    write_report(opts.get("storage", DEFAULT_STORAGE), opts["study"], out_dir=opts.get("out"),
                 log_to_mlflow=opts.get("mlflow", "true").lower() != "false",
                 companions=[name for name in opts.get("with", "").split(",") if name])
    return 0


def _data(args) -> int:
    from hybrids.training.tasks.sample import sample

    sample(args.options)
    return 0


def _eval(args) -> int:
    from hybrids.evaluation.runner import evaluate, table

    print(table(evaluate(args.options)))
    return 0


def _profile(args) -> int:
    from hybrids import profile, profile_output

    if args.tracking_uri and importlib.util.find_spec("mlflow") is None:  # say so before minutes of measuring
        raise blocks.ConfigError("--tracking-uri needs MLflow, which is not installed (pip install mlflow)")
    rows = profile.profile(args.models, args.seq_lens, args.batches, device=args.device, dtype=args.dtype,
                           decode_tokens=args.decode_tokens, repeats=args.repeats, match=args.match,
                           overrides=dict(args.set))
    out = Path(args.out)
    files = [profile_output.write_csv(rows, out / "profile.csv"),
             profile_output.bytes_figure(rows, out / "profile.png"),
             profile_output.latency_figure(rows, out / "profile-latency.png")]
    record = {"csv": str(files[0]), "figure": str(files[1]), "latency_figure": str(files[2]), "rows": rows}
    if args.tracking_uri:
        params = {"models": " ".join(args.models), "seq_lens": " ".join(map(str, args.seq_lens)),
                  "batches": " ".join(map(str, args.batches)), "device": args.device, "dtype": args.dtype,
                  "match": args.match, "decode_tokens": args.decode_tokens, "repeats": args.repeats}
        record["mlflow_run_id"] = profile_output.log_to_mlflow(rows, args.tracking_uri, files, params)
    print(json.dumps(record, indent=1))
    return 0


def _profile_parser(sub) -> None:
    pr = sub.add_parser("profile", help="measured KV-cache + state bytes, prefill / decode / training latency and "
                                        "memory vs context length: hybrids profile llama-tiny mamba-tiny zamba-tiny")
    pr.add_argument("models", nargs="*", default=["llama-tiny", "mamba-tiny", "zamba-tiny", "zamba2-tiny"],
                    help="recipes, YAML files or layouts (default: a transformer, a pure Mamba and two Zamba-style "
                         "hybrids)")
    pr.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024],
                    help="cache lengths in tokens (GPU: e.g. 1024 2048 4096 8192 16384 32768)")
    pr.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes (GPU: e.g. 1 4 16)")
    pr.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    pr.add_argument("--dtype", default="fp32", choices=list(accounting.DTYPES), help="weights and caches")
    pr.add_argument("--decode-tokens", type=int, default=4, help="tokens decoded one at a time after the prompt")
    pr.add_argument("--repeats", type=int, default=3, help="timed runs per point (median; one more warms up)")
    pr.add_argument("--match", default="zamba-tiny", help="widen every model to this model's unique parameters "
                                                         "('none': keep each width)")
    pr.add_argument("--set", type=_assignment, action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every model, e.g. d_model=1024 (repeatable)")
    pr.add_argument("--out", default="runs/profile", help="folder of profile.csv, profile.png, profile-latency.png")
    pr.add_argument("--tracking-uri", help="log the rows and figures to MLflow there (e.g. sqlite:///runs/mlflow.db)")
    pr.set_defaults(run=_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrids", description="Hybrid SSM / attention model experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("blocks", help="list the registered blocks").set_defaults(run=_blocks)
    lay = sub.add_parser("layout", help="resolve a layout string and account for a model built from it")
    lay.add_argument("text", help='a layout such as "6M:A*"')
    lay.add_argument("--depth", type=int, default=None, help="tile the layout to this many backbone layers")
    lay.add_argument("--d-model", type=int, default=None, help="model width (default: the config default)")
    _accounting_options(lay)
    lay.set_defaults(run=_layout)
    info = sub.add_parser("info", help="parameters, FLOPs and cache bytes of a model")
    info.add_argument("source", help='a recipe name ("zamba-7b"), a YAML file, a layout ("6M:A*"), an HF model '
                                     'directory or an HF family ("hf:bamba", "hf:falcon_h1", ...)')
    info.add_argument("--layers", action="store_true", help="also list the layout layer by layer")
    _accounting_options(info)
    info.set_defaults(run=_info)
    tr = sub.add_parser("train", help="train a model: hybrids train model=zamba-tiny task=mqar trainer.max_steps=300")
    tr.add_argument("overrides", nargs="*", help="Hydra overrides of recipes/train.yaml (key=value, group=option)")
    tr.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
    tr.set_defaults(run=_train)
    sw = sub.add_parser("sweep", help="run (or top up) a study: hybrids sweep study=attention-spacing [workers=2]")
    sw.add_argument("overrides", nargs="*", help="study=<name>, study keys (n_trials=, workers=, storage=, ...) "
                                                 "and train.<override> for every trial")
    sw.set_defaults(run=_sweep)
    dt = sub.add_parser("data", help="look at a task's data: hybrids data sample task=multiquery_ar n=8 out=x.npz")
    dt.add_argument("action", choices=["sample"], help="sample: write n examples to an .npz file and print a few")
    dt.add_argument("options", nargs="*", help="task=<name> [task.<key>=<value> ...] [n=8] [seed=0] [split=train] "
                                               "[show=3] [out=FILE.npz] [overwrite=true]")
    dt.set_defaults(run=_data)
    rp = sub.add_parser("report", help="tables and figures of a study: hybrids report study=attention-spacing")
    rp.add_argument("options", nargs="*", help="study=<name> [storage=URL] [out=DIR] [mlflow=false]")
    rp.set_defaults(run=_report)
    ev = sub.add_parser("eval", help="evaluate a run or saved model: hybrids eval run=runs/train/<name> tasks=probes")
    ev.add_argument("options", nargs="*", help="run=DIR | model=DIR, tasks=probes,<lm-eval task>,... "
                                               "[limit=N] [min_len=64] [max_len=1024] [out=DIR] [mlflow=false] ...")
    ev.set_defaults(run=_eval)
    _profile_parser(sub)
    web = sub.add_parser("ui", help="MLflow UI on the tracking store (127.0.0.1 only) and the optuna-dashboard command")
    ui.add_arguments(web)
    web.set_defaults(run=ui.main_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: errors a user can cause end in one line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LayoutError, blocks.ConfigError, blocks.RegistryError) as err:
        print(f"hybrids: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybrids: interrupted", file=sys.stderr)
        return 130
    except PermissionError as err:  # a folder that turned read-only after the up-front checks
        print(f"hybrids: error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
