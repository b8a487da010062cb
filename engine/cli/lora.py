"""``dreamdeck lora inspect FILE [--json]``: what a LoRA file holds and which model it fits.

Reads the safetensors header (and the alpha scalars), never the weights, so it answers at
once even for a 14B LoRA: layout, rank, alpha, targeted modules and the base model
(14b / 1.3b / tiny) the shapes fit. A file that cannot be used exits with code 2 and one
line naming the file and what is wrong.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lora",
        help="inspect LoRA files (layout, rank, alpha, targets, base model)",
        description="Tools for Wan2.1 LoRA files (safetensors).",
    )
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION")
    i = sub.add_parser(
        "inspect",
        help="print a LoRA file's layout, rank, alpha, targets and base model",
        description="Read a LoRA file's header and print format, rank, alpha, targets and "
        "the base model its shapes fit.",
    )
    i.add_argument("file", help="a .safetensors LoRA file")
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.set_defaults(func=inspect)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def inspect(args: argparse.Namespace) -> int:
    import json
    import sys

    from engine.weights.lora import LoraError, read_alphas, read_lora_header, summary

    try:
        info = read_lora_header(args.file)
        s = summary(info, read_alphas(info))
    except LoraError as e:
        print(f"dreamdeck lora inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"file     {s['file']}")
    print(f"format   {s['format']}")
    print(f"rank     {s['rank']}" + (f"  (ranks {s['ranks']})" if len(s["ranks"]) > 1 else ""))
    print(f"alpha    {s['alpha']}" + (f"  (scale {s['scale']:g})" if s["scale"] else ""))
    print(f"base     {s['base'] or 'none of 14b, 1.3b, tiny'}")
    print(f"targets  {', '.join(s['targets'])}")
    print(f"modules  {s['modules']} in {s['blocks']} blocks; parts {', '.join(s['parts'])}")
    print(f"size     {s['bytes'] / 2**20:.1f} MiB")
    return 0
