"""`dreamdeck doctor`: can this machine run this preset, and if not, what fixes it.

Checks the models folder (each file's presence, size and header: a truncated download is
caught here, not as a crash at load time), the GPU and memory, the attention backends and
output transports that import, and whether the control ports are free. With `--preset`,
the exit code is 1 when that preset cannot run, and the commands that fix it are printed.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check model files, GPU, backends, outputs and ports",
        description=(
            "Report what is present or missing for a preset, the GPU and memory, attention"
            " backends, output transports and control ports. Exit code 1 when --preset cannot run."
        ),
    )
    p.add_argument("--preset", help="engine preset name or YAML path to check (else: report only)")
    p.add_argument(
        "--models-dir",
        help="models folder (default: $DREAMDECK_MODELS or ~/.cache/dreamdeck/models)",
    )
    p.add_argument(
        "--host", help="address the control ports listen on (default: the preset's, or 127.0.0.1)"
    )
    p.add_argument("--osc-port", type=int, help="OSC UDP port (default: the preset's, or 9137)")
    p.add_argument(
        "--oscquery-port", type=int, help="OSCQuery HTTP port (default: the preset's, or 9138)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _importable(name: str) -> tuple[bool, str]:
    try:
        importlib.import_module(name)
        return True, ""
    except Exception as e:  # broken CUDA extensions raise more than ImportError
        return False, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _port_free(host: str, port: int, kind: int) -> tuple[bool, str]:
    if not 0 < port < 65536:
        return False, f"{port} is not a port number"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
            s.bind((host, port))
        return True, ""
    except OSError as e:
        return False, e.strerror or str(e)


def _host_memory() -> dict[str, float]:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
        return {"total_gb": info["MemTotal"] / 1e9, "available_gb": info["MemAvailable"] / 1e9}
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return {"total_gb": total / 1e9}
        except (ValueError, OSError, AttributeError):
            return {}


def _gpu() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": [],
    }
    if out["available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            out["devices"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_total_gb": round(total / 1e9, 2),
                    "memory_free_gb": round(free / 1e9, 2),
                }
            )
    return out


def _attention(gpu: dict[str, Any], requested: str | None) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for mod in ("flash_attn_interface", "flash_attn", "sageattention"):
        ok, why = _importable(mod)
        out[mod] = {"available": ok, **({"error": why} if why else {})}
    cudnn = bool(gpu["available"] and torch.backends.cudnn.is_available())
    out["cudnn_sdpa"] = {"available": cudnn}
    out["sdpa"] = {"available": True}
    try:
        from engine.models.attention import select_backend

        device = "cuda" if gpu["available"] else "cpu"
        out["selected"] = select_backend(None if requested in (None, "auto") else requested, device)
    except Exception as e:  # a forced backend that cannot run here
        out["selected"] = None
        out["selection_error"] = str(e)
    return out


def _outputs() -> dict[str, Any]:
    out: dict[str, Any] = {"shm": {"available": True}}
    ok, why = _importable("cyndilib")
    out["ndi"] = {"available": ok, **({"error": why} if why else {})}
    if sys.platform == "win32":
        ok, why = _importable("SpoutGL")
        out["spout"] = {"available": ok, **({"error": why} if why else {})}
    else:
        out["spout"] = {"available": False, "error": "Spout exists on Windows only"}
    return out


def diagnose(args) -> dict[str, Any]:
    """Everything `doctor` reports, as plain data (also what --json prints)."""
    from engine.weights import catalog
    from engine.weights.download import free_space

    report: dict[str, Any] = {"problems": [], "fixes": [], "warnings": []}
    problems, fixes, warnings = report["problems"], report["fixes"], report["warnings"]
    preset = None
    if args.preset:
        from engine.runtime.presets import load_preset

        try:
            preset = load_preset(args.preset)
        except (ValueError, OSError) as e:
            problems.append(f"preset: {e}")
    report["preset"] = None if preset is None else preset.name or args.preset

    root = catalog.resolve_models_dir(args.models_dir)
    report["models_dir"] = str(root)
    report["disk_free_gb"] = round(free_space(root) / 1e9, 2)
    needs = None
    required: set[tuple[str, str]] = set()
    if preset is not None:
        try:
            needs = catalog.needs_of(preset)
            required = {(f.repo, f.filename) for f in catalog.required_files(needs)}
        except ValueError as e:
            problems.append(f"preset {preset.name}: {e}")
    report["needs"] = (
        None
        if needs is None
        else {k: getattr(needs, k) for k in ("model", "decoder", "vace", "text_encoder")}
    )
    files = []
    for f in [*catalog.FILES.values(), *catalog.TOKENIZER_FILES]:
        p = f.find(root)  # the models folder, or the Hugging Face cache
        why = catalog.check_file(p)
        files.append(
            {
                "role": f.role,
                "repo": f.repo,
                "filename": f.filename,
                "path": str(p),
                "required": (f.repo, f.filename) in required and not f.optional,
                "optional": f.optional,
                "present": p.is_file(),
                "size": p.stat().st_size if p.is_file() else None,
                "problem": why,
            }
        )
    report["files"] = files
    if needs is not None:
        missing = catalog.missing_files(needs, root)
        for m in missing:
            problems.append(f"model file {m.path}: {m.reason}")
        if missing:
            cmd_models = args.models_dir if args.models_dir else None
            fix_needs = catalog.Needs(
                needs.model, needs.decoder, needs.vace, needs.text_encoder, preset=args.preset
            )
            fixes.append(catalog.download_command(fix_needs, cmd_models))

    gpu = _gpu()
    report["gpu"] = gpu
    report["host_memory"] = _host_memory()
    report["attention"] = _attention(gpu, getattr(preset, "attention", None))
    report["outputs"] = _outputs()

    host = args.host or (preset.ports.host if preset is not None else "127.0.0.1")
    osc = (
        args.osc_port
        if args.osc_port is not None
        else (preset.ports.osc if preset is not None else 9137)
    )
    oscq = (
        args.oscquery_port
        if args.oscquery_port is not None
        else (preset.ports.oscquery if preset is not None else 9138)
    )
    ports = []
    for name, port, kind, proto, flag in (
        ("osc", osc, socket.SOCK_DGRAM, "udp", "--osc-port"),
        ("oscquery", oscq, socket.SOCK_STREAM, "tcp", "--oscquery-port"),
    ):
        free, why = _port_free(host, port, kind)
        ports.append(
            {
                "name": name,
                "protocol": proto,
                "host": host,
                "port": port,
                "free": free,
                **({"error": why} if why else {}),
            }
        )
        if not free:
            problems.append(f"{name} port {proto} {host}:{port} is not free ({why})")
            fixes.append(f"pick another port: dreamdeck run ... {flag} <port>")
    report["ports"] = ports

    if preset is not None:
        needs_cuda = (
            preset.device == "cuda"
            or (preset.device == "auto" and preset.model != "tiny")
            or preset.fp8
        )
        if needs_cuda and not gpu["available"]:
            problems.append(
                f"preset {report['preset']} needs a CUDA GPU and torch sees none"
                f" (torch {gpu['torch']}, CUDA build: {gpu['cuda']})"
            )
            fixes.append("run on a machine with an NVIDIA GPU, or try: dreamdeck run --preset tiny")
        if gpu["available"] and preset.fp8:
            caps = [tuple(int(x) for x in d["capability"].split(".")) for d in gpu["devices"]]
            if max(caps) < (8, 9):
                problems.append(
                    f"preset {report['preset']} uses fp8 weights, which need fp8 tensor cores"
                    f" (Ada, Hopper or Blackwell: sm 8.9+); this GPU is sm"
                    f" {'.'.join(map(str, max(caps)))}"
                )
                fixes.append("set fp8: false in a copy of the preset (and a smaller resolution)")
        if gpu["available"] and preset.model == "14b":
            total = max(d["memory_total_gb"] for d in gpu["devices"])
            # Peaks measured on an H100 (docs/PERFORMANCE.md, runs 7-11): weights (14 GB fp8,
            # 28 GB bf16) plus about 4.4 MB per token of a latent frame (context KV cache,
            # activations, TAEHV and the anchor encoder; 1.1 MB less with an fp8 cache), plus
            # the text encoder where it lives on the GPU.
            tokens = (preset.height // 16) * (preset.width // 16)
            per_token = 0.0044 - (0.0011 if preset.kv_cache == "fp8" else 0.0)
            need = (14 if preset.fp8 else 28) + per_token * tokens
            need += (
                0
                if preset.text_encoder == "cpu"
                else (6.3 if preset.text_encoder == "gpu-fp8" else 10.6)
            )
            need = round(need)
            if total < need:
                warnings.append(
                    f"the largest GPU has {total:.0f} GB; preset {report['preset']} needs roughly {need} GB"
                    " (try fp8: true and text_encoder: cpu)"
                )
        if preset.outputs.ndi and not report["outputs"]["ndi"]["available"]:
            problems.append(
                f"outputs.ndi is set but NDI (cyndilib) does not import: {report['outputs']['ndi'].get('error')}"
            )
        if preset.outputs.spout and not report["outputs"]["spout"]["available"]:
            problems.append(
                f"outputs.spout is set but Spout is unavailable: {report['outputs']['spout'].get('error')}"
            )
        if "selection_error" in report["attention"]:
            problems.append(f"attention: {report['attention']['selection_error']}")
    from engine.parallel.launch import topology

    par = report["parallel"] = topology()
    if preset is not None and preset.gpus > 1:
        if preset.gpus > par["gpu_count"] and preset.device != "cpu":
            problems.append(
                f"preset {report['preset']} needs {preset.gpus} GPUs (gpus: {preset.gpus});"
                f" {par['gpu_count']} visible"
            )
        elif preset.device != "cpu" and not par["nccl"]:
            problems.append("gpus > 1 needs NCCL, and this torch build has none")
        elif par["all_peers"] is False:
            warnings.append(
                "some GPU pairs have no peer access: NCCL goes through host memory, and the"
                " speed-up of gpus > 1 will be far below the NVLink one"
            )
    report["ok"] = not problems
    return report


def _why_optional(f: dict[str, Any], preset: bool) -> str:
    """Why a missing file is no problem, if it is not: a new user reading "missing" next to
    a 6 GB VACE module should not think the install is broken."""
    if f["required"]:
        return ""
    if f["role"] == "vace":
        return " (optional: only for VACE, --vace)"
    if f["optional"]:
        return " (optional)"
    return " (optional: not used by this preset)" if preset else ""


def _human(r: dict[str, Any]) -> str:
    lines = [f"models folder: {r['models_dir']} ({r['disk_free_gb']:.1f} GB free)"]
    if r["preset"]:
        n = r["needs"] or {}
        lines.append(
            f"preset: {r['preset']} (model {n.get('model')}, decoder {n.get('decoder')}, vace {n.get('vace')})"
        )
    for f in r["files"]:
        if f["problem"] is None:
            state = f"ok      {f['size'] / 1e6:10.1f} MB"
        elif f["present"]:
            state = f"BAD     {f['problem']}"
        else:
            state = "missing" + _why_optional(f, bool(r["preset"]))
        mark = "*" if f["required"] else " "
        lines.append(f" {mark} {state:30} {f['repo']}/{f['filename']}")
    if r["preset"]:
        lines.append("   (* = needed by the preset)")
    g = r["gpu"]
    if g["available"]:
        for d in g["devices"]:
            lines.append(
                f"gpu {d['index']}: {d['name']} (sm {d['capability']}), {d['memory_free_gb']:.1f}/"
                f"{d['memory_total_gb']:.1f} GB free; torch {g['torch']}, CUDA {g['cuda']}"
            )
    else:
        lines.append(f"gpu: none visible to torch {g['torch']} (CUDA build: {g['cuda']})")
    hm = r["host_memory"]
    if hm:
        lines.append(
            f"host memory: {hm.get('available_gb', float('nan')):.1f}/{hm.get('total_gb', float('nan')):.1f} GB available"
        )
    par = r.get("parallel")
    if par is not None:
        peers = {None: "n/a", True: "all pairs", False: "NOT all pairs"}[par["all_peers"]]
        lines.append(
            f"several GPUs (--gpus): {par['gpu_count']} GPU(s), peer access {peers},"
            f" NCCL {par['nccl_version'] or 'yes' if par['nccl'] else 'no'},"
            f" gloo {'yes' if par['gloo'] else 'no'}"
        )
    a = r["attention"]
    avail = [
        k
        for k in ("flash_attn_interface", "flash_attn", "sageattention", "cudnn_sdpa", "sdpa")
        if a[k]["available"]
    ]
    lines.append(f"attention: available {', '.join(avail)}; selected {a.get('selected')}")
    o = r["outputs"]
    lines.append(
        "outputs: " + ", ".join(f"{k} {'yes' if v['available'] else 'no'}" for k, v in o.items())
    )
    for p in r["ports"]:
        state = "free" if p["free"] else f"IN USE ({p.get('error')})"
        lines.append(f"port {p['name']}: {p['protocol']} {p['host']}:{p['port']} {state}")
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    for p in r["problems"]:
        lines.append(f"problem: {p}")
    for fx in dict.fromkeys(r["fixes"]):
        lines.append(f"fix: {fx}")
    if r["preset"] or r["problems"]:
        lines.append("ready" if r["ok"] else "NOT READY")
    return "\n".join(lines)


def run(args) -> int:
    report = diagnose(args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(_human(report))
    return 0 if report["ok"] else 1
