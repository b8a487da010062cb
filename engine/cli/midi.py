"""`dreamdeck midi ports | check FILE... | learn`: MIDI set-up without starting the engine."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("midi", help="MIDI controllers: list ports, check maps, learn")
    sub = p.add_subparsers(dest="midi_command", metavar="ACTION")
    sub.required = True
    ports = sub.add_parser("ports", help="list MIDI input and output ports")
    ports.set_defaults(func=_ports)
    check = sub.add_parser("check", help="validate MIDI map files (errors give file:line)")
    check.add_argument("files", nargs="+", metavar="FILE", help="map YAML or shipped map name")
    check.set_defaults(func=_check)
    learn = sub.add_parser(
        "learn", help="move a control, pick a target, append the mapping to a map file"
    )
    learn.add_argument("--port", default=".", metavar="REGEX", help="input ports to listen on")
    learn.add_argument("--target", default=None, metavar="PATH", help="registry path (no prompt)")
    learn.add_argument(
        "--out", default="learned.yaml", metavar="FILE", help="map file to create or append to"
    )
    learn.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a control")
    learn.add_argument("--count", type=int, default=1, help="controls to learn in a row")
    learn.set_defaults(func=_learn)


def _ports(args: argparse.Namespace) -> int:
    from bridges.midi.ports import MidiUnavailable, input_names, output_names

    try:
        ins, outs = input_names(), output_names()
    except MidiUnavailable as e:
        print(f"dreamdeck midi ports: {e}", file=sys.stderr)
        return 1
    print("inputs:")
    for n in ins or ["(none)"]:
        print(f"  {n}")
    print("outputs:")
    for n in outs or ["(none)"]:
        print(f"  {n}")
    if sys.platform.startswith("win"):
        print("(virtual ports need loopMIDI on Windows)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from bridges.midi.maps import MapError, MapFileError, duplicates, load_map, resolve_map_path
    from engine.runtime.controls import make_registry

    registry = make_registry()
    bad = unreadable = 0
    for f in args.files:
        try:
            m = load_map(resolve_map_path(f), registry)
        except MapError as e:
            bad += 1
            unreadable += isinstance(e, MapFileError)  # not a map at all: a usage error
            _print_some(e.problems)
            continue
        problems, notes = duplicates(m)
        _print_some(notes, "note: ")
        if problems:
            bad += 1
            _print_some(problems)
            print(f"{m.file}: {len(problems)} duplicate mappings", file=sys.stderr)
            continue
        fb = sum(b.feedback is not None for b in m.bindings)
        print(
            f"{m.file}: ok: {len(m.bindings)} mappings ({fb} with feedback), "
            f"{len(m.presets)} presets, device /{m.device}/"
        )
    return 2 if unreadable else 1 if bad else 0


def _print_some(lines: list[str], prefix: str = "", limit: int = 20) -> None:
    """The first `limit` lines, then a count: a map with 25,000 bad lines must not print
    25,000 lines."""
    for line in lines[:limit]:
        print(prefix + line, file=sys.stderr)
    if len(lines) > limit:
        print(f"{prefix}... and {len(lines) - limit} more like these", file=sys.stderr)


def _ask_target(registry, prompt_for: str) -> str | None:
    paths = [p.path for p in registry]
    print(f"learned: {prompt_for}")
    print("targets: " + ", ".join(paths))
    while True:
        try:
            answer = input("target path (empty to skip)> ").strip()
        except EOFError:
            return None
        if not answer:
            return None
        if answer in registry:
            return registry.param(answer).path
        import difflib

        close = difflib.get_close_matches(answer, paths, n=3)
        print(f"unknown path {answer!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _learn(args: argparse.Namespace) -> int:
    import queue

    from bridges.midi.learn import Learner, device_regex, finish, mapping_line, write_mapping
    from bridges.midi.maps import MapError
    from bridges.midi.ports import MidiUnavailable, PortWatcher
    from engine.cli import UsageError
    from engine.runtime.controls import make_registry

    registry = make_registry()
    if args.target is not None and args.target not in registry:
        raise UsageError(f"--target {args.target!r} is not a registry path")
    inbox: queue.Queue = queue.Queue()
    try:
        watcher = PortWatcher(args.port, on_message=lambda n, m, t: inbox.put((n, m, t)))
        watcher.scan()
    except (MidiUnavailable, ValueError) as e:
        print(f"dreamdeck midi learn: {e}", file=sys.stderr)
        return 1
    if not watcher.ports:
        print(f"dreamdeck midi learn: no MIDI input matches {args.port!r}", file=sys.stderr)
        watcher.close()
        return 1
    print("listening on: " + ", ".join(watcher.ports) + " (move one control)")
    try:
        for _ in range(args.count):
            learner, port = Learner(), None
            deadline = time.monotonic() + args.timeout
            while not learner.done(time.time()):
                if time.monotonic() > deadline:
                    print("dreamdeck midi learn: no control moved", file=sys.stderr)
                    return 1
                try:
                    name, msg, t = inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                if learner.feed(msg, t):
                    port = port or name
            spec = learner.classify()
            shown = mapping_line({k: v for k, v in spec.items() if k != "button"})
            target = args.target or _ask_target(registry, shown)
            if target is None:
                print("skipped")
                continue
            try:
                mapping = finish(spec, target, registry)
                line = write_mapping(args.out, mapping, device_regex(port or "."))
            except MapError as e:
                print("\n".join(e.problems), file=sys.stderr)
                return 1
            print(f"{args.out}: {line.strip()}")
            while not inbox.empty():  # the tail of this gesture is not the next control
                inbox.get_nowait()
    finally:
        watcher.close()
    return 0
