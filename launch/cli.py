"""The `minillm` command line.

    minillm train [--config NAME|FILE.yaml] [section.key=value ...] [--resume] [--no-progress]
    minillm export CHECKPOINT --out DIR [--overwrite] [--push-to-hub ORG/NAME [--private] [--dry-run]]
    minillm serve-teacher MODEL_DIR [--host 127.0.0.1] [--port 8000] [--device cpu] [--dtype float32]
                          [--token-budget 16384]
    minillm config [--config ...] [overrides ...]     print the resolved config
    minillm build-assets                              rebuild the embedded tiny models and corpus

Errors a user fixes (a setting, a file, a server) print one line and exit with 2; MINILLM_TRACEBACK=1 shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from launch.config import ConfigError, load_config


def _train(args) -> int:
    overrides = list(args.overrides)
    if args.resume and not any(o.startswith("checkpoint.resume=") for o in overrides):  # a given PATH stays
        overrides.append("checkpoint.resume=auto")
    cfg = load_config(args.config, overrides)  # all validation happens here, before any model loads
    from trainer.loop import Hooks, train
    train(cfg, Hooks(progress=not args.no_progress))
    return 0


def _config(args) -> int:
    cfg = load_config(args.config, list(args.overrides))
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _export(args) -> int:
    from trainer.export import export_main
    export_main(args.checkpoint, args.out, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
                private=args.private, dry_run=args.dry_run)
    return 0


def _serve_teacher(args) -> int:
    from teacher.http_service import serve_teacher
    from launch.config import resolve_path

    if args.token_budget < 1:
        raise ConfigError(f"--token-budget must be >= 1, got {args.token_budget}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    serve_teacher(resolve_path(args.model), host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                  token_budget=args.token_budget)
    return 0


def _build_assets(args) -> int:
    from launch.build_assets import main
    main([])
    return 0


def parser() -> argparse.ArgumentParser:
    """The `minillm` parser; `.commands` maps each command to its subparser (for intermixed parsing)."""
    ap = argparse.ArgumentParser(prog="minillm", description="On-policy distillation of LLMs (MiniLLM, GKD, ...).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", default=None, help="a shipped config name (see launch/configs) or a YAML file; "
                       "default: cpu_tiny, the embedded CPU example")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5 rollout.max_new_tokens=64")

    p = sub.add_parser("train", help="run a distillation job")
    with_config(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint (checkpoint.resume=auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help="print the resolved, validated config")
    with_config(p)
    p.set_defaults(func=_config)

    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face model folder (and push it)")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest complete checkpoint)")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None, help="upload the folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nothing")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve-teacher", help="serve a teacher's token log-probs over HTTP (see teacher/API.md)")
    p.add_argument("model", help="teacher model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--token-budget", type=int, default=16384)
    p.set_defaults(func=_serve_teacher)

    p = sub.add_parser("build-assets", help="rebuild the embedded tiny teacher and student, tokenizer and corpus")
    p.set_defaults(func=_build_assets)
    ap.commands = dict(sub.choices)
    return ap


def _user_errors() -> tuple:
    """What a user fixes (a setting, a file, a server, a login): one line, not a traceback."""
    from teacher.http_client import TeacherUnavailableError
    from teacher.tokenizer_check import TokenizerMismatchError
    return OSError, TokenizerMismatchError, TeacherUnavailableError


def _unrecognized(extra: list[str]) -> str:
    """argparse's message, plus the override a `--key value` (TRL / HF Trainer style) was likely meant as."""
    from launch.config import TRL_NAMES, section_with
    msg = f"unrecognized arguments: {' '.join(extra)}"
    flags = [a.split("=", 1)[0] for a in extra if a.startswith("--")]
    if flags:
        msg += "; settings are overrides written key=value (e.g. trainer.lr=1e-5)"
        meant = []
        for flag in flags:
            name = flag[2:].replace("-", "_")
            target = TRL_NAMES.get(name) or (f"{section_with(name)}.{name}" if section_with(name) else None)
            if target:
                meant.append(f"{flag} is {target} here")
        if meant:
            msg += ": " + "; ".join(meant)
    return msg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser()
    if argv and argv[0] in ap.commands:  # options and overrides in any order: `train a=1 --resume b=2`
        sp = ap.commands[argv[0]]
        args, extra = sp.parse_known_intermixed_args(argv[1:])
        if extra:
            takes_overrides = argv[0] in ("train", "config")
            sp.error(_unrecognized(extra) if takes_overrides else f"unrecognized arguments: {' '.join(extra)}")
    else:
        args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        if os.environ.get("MINILLM_TRACEBACK"):
            raise
        print(f"minillm: config error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        if os.environ.get("MINILLM_TRACEBACK"):
            raise
        print(f"minillm: {e} (MINILLM_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
