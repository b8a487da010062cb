"""`dreamdeck download`: fetch the model files a preset needs into the models folder."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "download",
        help="download the model files a preset needs (resumable)",
        description=(
            "Download only what the chosen preset needs (or what --model/--decoder/--vace say) from"
            " the Hugging Face hub into the models folder. Interrupted downloads resume. Set"
            " HF_TOKEN for gated or private repos, HF_ENDPOINT for a mirror."
        ),
    )
    p.add_argument("--preset", help="engine preset name or YAML path (its model/decoder/vace)")
    p.add_argument(
        "--model", choices=["14b", "1.3b", "tiny"], help="model (default: 14b, or the preset's)"
    )
    p.add_argument(
        "--decoder", choices=["wan", "tae"], help="frame decoder (default: tae, or the preset's)"
    )
    p.add_argument(
        "--vace", action=argparse.BooleanOptionalAction, default=None, help="also fetch VACE 14B"
    )
    p.add_argument(
        "--rife",
        action="store_true",
        help="also fetch the RIFE v4.25 frame interpolation weights (run --fps 30|60)",
    )
    p.add_argument(
        "--models-dir",
        help="models folder (default: $DREAMDECK_MODELS or ~/.cache/dreamdeck/models)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of large files")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be fetched, download nothing"
    )
    p.set_defaults(func=run)


def needs_from_args(args):
    """The catalog Needs for the flags: a preset's keys overridden by explicit flags."""
    from engine.cli import UsageError
    from engine.weights.catalog import Needs, needs_of

    base = Needs()
    if args.preset:
        try:
            base = needs_of(args.preset)
            base = Needs(base.model, base.decoder, base.vace, base.text_encoder, preset=args.preset)
        except (ValueError, OSError) as e:  # PresetError is a ValueError
            raise UsageError(str(e)) from None
    over = {"model": args.model, "decoder": args.decoder, "vace": args.vace}
    if any(v is not None for v in over.values()):
        merged = {k: (v if v is not None else getattr(base, k)) for k, v in over.items()}
        try:
            return Needs(**merged, text_encoder=base.text_encoder)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return base


def run(args) -> int:
    import sys

    from engine.cli import UsageError
    from engine.weights.catalog import required_files, resolve_models_dir
    from engine.weights.download import DownloadError, check_disk, download_files, plan

    needs = needs_from_args(args)
    try:
        files = required_files(needs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if getattr(args, "rife", False):
        from engine.weights.catalog import FILES

        files = [*files, FILES["rife"]]
    root = resolve_models_dir(args.models_dir)
    if not files:
        print(f"model {needs.model!r} needs no downloads")
        return 0
    try:
        if args.dry_run:
            plans = plan(files, root)
            need = check_disk(plans, root, margin=0)
            for p in plans:
                state = (
                    "present"
                    if p.done
                    else "absent"
                    if p.absent
                    else f"fetch {p.to_fetch / 1e6:.1f} MB"
                )
                print(f"{state:>20}  {p.dest}")
            print(f"total to download: {need / 1e9:.2f} GB into {root}")
            return 0
        download_files(files, root, verify=not args.no_verify)
    except DownloadError as e:
        print(f"dreamdeck download: error: {e}", file=sys.stderr)
        return 1
    print(f"all files for {needs.preset or needs.model} are in {root}")
    return 0
