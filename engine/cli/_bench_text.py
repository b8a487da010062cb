"""`dreamdeck bench --text PLACEMENT`: time the UMT5-XXL text encoder with random weights
(gpu = bf16 on the GPU, fp8 = fp8 weights on the GPU, cpu = float32 on the host), for a
long detailed prompt and for a full 512-token one, with the memory each placement takes."""

from __future__ import annotations

import json
import sys

LONG_PROMPT = (
    "A cartoon dog with big expressive eyes and floppy ears suddenly leaps into the frame, tail"
    " wagging, and then sprints joyfully toward the camera. Its oversized paws pound playfully on"
    " the ground, tongue hanging out in excitement. The animation style is colorful, smooth, and"
    " bouncy, with exaggerated motion to emphasize energy and fun. The background blurs slightly"
    " with speed lines, giving a lively, comic-style effect as if the dog is about to jump right"
    " into the viewer."
)


def run_text_bench(placement: str, as_json: bool) -> int:
    import torch

    from engine.models.text_encoder import UMT5_XXL, random_text_encoder, time_encode

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    enc = random_text_encoder(
        UMT5_XXL, placement=placement, output_device="cuda" if cuda else "cpu"
    )
    weights_gb = (torch.cuda.memory_allocated() - base) / 2**30 if cuda else None
    full = " ".join(f"w{i}" for i in range(600))  # past 512 tokens: truncated to 512
    result = {
        "text_encoder": "umt5-xxl (random weights)",
        "placement": placement,
        "long_prompt_ms": time_encode(enc, [LONG_PROMPT]),
        "512_tokens_ms": time_encode(enc, [full], repeats=3),
        "gpu_weights_gb": weights_gb,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    if as_json:
        print(json.dumps(result))
    else:
        json.dump(result, sys.stdout, indent=1)
        print()
    return 0
