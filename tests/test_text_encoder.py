"""Text encoder: Wan checkpoint names, tokenisation, zeroing, fp8, the tiny stand-in.

Oracles: transformers' UMT5EncoderModel on the same weights; a slow functional forward of
Wan's T5 structure written here (so a swapped gate/fc1 map fails even though the round trip
through our own inverse map would not); sentencepiece itself for tokenisation.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from engine.models import text_encoder as te
from engine.weights.checkpoint import WeightsError

SPEC = te.UMT5Spec(vocab=256, dim=32, dim_ffn=48, heads=4, layers=2, buckets=8, max_distance=128)

CORPUS = [
    "a neon forest at night with glowing mushrooms",
    "the quick brown fox jumps over the lazy dog",
    "liquid chrome sculptures melting in slow motion",
    "a cat sits on a red mat under the full moon",
    "ein Hund läuft über die Straße im Regen",
    "城市夜景 霓虹灯 雨",
    "fractal kaleidoscope of butterflies and stained glass",
    "underwater city with jellyfish lanterns and coral towers",
    "0123456789 numbers dance across the screen",
    "smoke, fire, water & ice: the four elements collide!",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A real sentencepiece model trained here, laid out like `google/umt5-xxl` (spiece.model
    + tokenizer_config.json), plus a transformers tokenizer.json folder built from it."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tok")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=200,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp_dir = d / "sp"
    sp_dir.mkdir()
    (sp_dir / "spiece.model").write_bytes(buf.getvalue())
    (sp_dir / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0}'
    )
    # The transformers layout (tokenizer.json), as the -Diffusers repos ship it.
    from transformers import T5Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    hf_dir = d / "hf"
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(hf_dir))
    return sp_dir, hf_dir, sp


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5EncoderModel

    torch.manual_seed(1)
    m = UMT5EncoderModel(SPEC.hf_config()).eval()
    with torch.no_grad():  # make the norms and position biases non-trivial
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in n:
                p.normal_(0, 0.5)
    return m


def to_wan(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        wk = te.hf_to_wan_key(k)
        if wk is not None:
            out[wk] = v.clone()
    return out


# --- slow reference of Wan's T5 encoder structure --------------------------------------------


def _bucket(rel: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    half = buckets // 2
    out = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    large = (
        exact
        + (
            torch.log(n.float().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (half - exact)
        ).long()
    )
    large = large.clamp(max=half - 1)
    return out + torch.where(n < exact, n, large)


def wan_reference(sd, ids, lengths, spec):
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    B, L = ids.shape
    H, C = spec.heads, spec.dim // spec.heads
    mask = torch.arange(L)[None] < lengths[:, None]
    x = sd["token_embedding.weight"][ids]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # key - query
    buckets = _bucket(rel, spec.buckets, spec.max_distance)
    for i in range(spec.layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{n}.weight"].T).view(B, L, H, C) for n in ("q", "k", "v"))
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [H, L, L]
        logits = torch.einsum("bqhc,bkhc->bhqk", q, k) + bias
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        a = torch.einsum("bhqk,bkhc->bqhc", logits.softmax(-1), v).reshape(B, L, H * C)
        x = x + a @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        f = (h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)
        x = x + f @ sd[p + "ffn.fc2.weight"].T
    x = rms(x, sd["norm.weight"])
    return x * mask[..., None]


# --- tests ------------------------------------------------------------------------------------


def test_key_map_is_a_bijection_over_a_real_state_dict(hf_model):
    hf_keys = set(hf_model.state_dict())
    wan = to_wan(hf_model)
    assert len(wan) == len(hf_keys) - 1  # the tied embed_tokens has no Wan name
    back = te.convert_wan_t5(wan)
    assert set(back) == hf_keys
    for k, v in back.items():
        assert torch.equal(v, hf_model.state_dict()[k]), k
    assert "blocks.1.ffn.gate.0.weight" in wan and "blocks.0.pos_embedding.embedding.weight" in wan


def test_wan_checkpoint_loads_and_matches_transformers_and_wan_reference(
    tmp_path, tok_dir, hf_model
):
    sp_dir, _, _ = tok_dir
    wan = to_wan(hf_model)
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(wan, path)
    enc = te.load_text_encoder(path, sp_dir, placement="cpu", dtype=torch.float32)
    assert te.spec_from_wan_state_dict(wan).layers == SPEC.layers
    texts = [
        "a neon forest at night",
        "liquid chrome sculptures melting in slow motion over the sea",
    ]
    out = enc.encode(texts)
    assert out.shape == (2, 512, SPEC.dim)

    ids, lengths = enc.tokenizer([te.clean_text(t) for t in texts], 512)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        oracle = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
        ref = wan_reference(wan, ids, lengths, SPEC)
    n = ids.shape[1]
    torch.testing.assert_close(out[:, :n], oracle, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, :n], ref, rtol=1e-4, atol=1e-5)
    assert out[:, n:].abs().max() == 0


def test_short_run_equals_full_512_padding(tmp_path, tok_dir, hf_model):
    """Encoding only up to the longest prompt equals T5 over all 512 padded positions."""
    sp_dir, _, _ = tok_dir
    path = tmp_path / "t5.pth"
    torch.save(to_wan(hf_model), path)
    enc = te.load_text_encoder(path, sp_dir, placement="cpu", dtype=torch.float32)
    texts = ["a cat", "the quick brown fox jumps over the lazy dog"]
    out = enc.encode(texts)
    ids, lengths = enc.tokenizer(texts, 512)
    full = torch.zeros(2, 512, dtype=torch.long)
    full[:, : ids.shape[1]] = ids
    mask = (torch.arange(512)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf_model(input_ids=full, attention_mask=mask).last_hidden_state * mask[..., None]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for i, n in enumerate(lengths.tolist()):
        assert out[i, :n].norm(dim=-1).min() > 0
        assert out[i, n:].abs().max() == 0


def test_tokenisation_padding_truncation(tok_dir):
    sp_dir, hf_dir, sp = tok_dir
    hf_tok = te.load_tokenizer(hf_dir)
    assert isinstance(hf_tok, te.HFTokenizer)
    sp_tok = te.SentencePieceTokenizer(sp_dir / "spiece.model")
    texts = [te.clean_text(t) for t in CORPUS[:4]]
    ids_a, len_a = hf_tok(texts, 512)
    ids_b, len_b = sp_tok(texts, 512)
    assert torch.equal(ids_a, ids_b) and torch.equal(len_a, len_b)
    for i, t in enumerate(texts):  # sentencepiece's own pieces, then EOS, then padding
        expect = sp.encode(t) + [1]
        assert ids_b[i, : len_b[i]].tolist() == expect
        assert (ids_b[i, len_b[i] :] == 0).all()
    long = " ".join(["neon forest glowing mushrooms"] * 400)
    for tok in (hf_tok, sp_tok):
        ids, lengths = tok([long, "a cat"], 512)
        assert ids.shape == (2, 512) and lengths.tolist() == [512, len(sp.encode("a cat")) + 1]
        assert ids[0, -1] == 1 and ids[0, :511].tolist() == sp.encode(long)[:511]


def test_sentencepiece_fallback_when_transformers_cannot_load(tmp_path, tok_dir):
    sp_dir, _, _ = tok_dir
    d = tmp_path / "broken"
    d.mkdir()
    (d / "spiece.model").write_bytes((sp_dir / "spiece.model").read_bytes())
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    assert isinstance(te.load_tokenizer(d), te.SentencePieceTokenizer)
    with pytest.raises(WeightsError, match="tokenizer folder not found"):
        te.load_tokenizer(tmp_path / "nowhere")


def test_clean_text():
    assert te.clean_text("  a\t\tneon \n forest  ") == "a neon forest"
    assert te.clean_text("fire &amp;amp; ice") == "fire & ice"
    assert te.clean_text("schÃ¶n") == "schön"  # mojibake repaired by ftfy


def test_bad_inputs(tmp_path, tok_dir):
    sp_dir, _, _ = tok_dir
    with pytest.raises(ValueError, match="placement"):
        te.normalize_placement("gpu2")
    assert te.normalize_placement("CUDA-fp8") == "fp8"
    path = tmp_path / "wrong.pth"
    torch.save({"blocks.0.attn.q.weight": torch.zeros(4, 4), "foo.bar": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="wrong.pth"):
        te.load_text_encoder(path, sp_dir, placement="cpu")
    enc = te.TinyTextEncoder(length=16, dim=16)
    with pytest.raises(ValueError):
        enc.encode("not a list")
    with pytest.raises(ValueError):
        enc.encode([])


def test_fp8_linear_and_encoder():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = te.Fp8Linear(lin, compute_dtype=torch.float32)
    assert q.qweight.dtype == torch.float8_e4m3fn and q.scale.shape == (32, 1)
    x = torch.randn(5, 64)
    ref = lin(x)
    err = (q(x) - ref).norm() / ref.norm()
    assert 0 < err < 0.05  # e4m3 has 3 mantissa bits: a few percent at most
    a = te.random_text_encoder(te.UMT5_TINY, placement="cpu", dtype=torch.float32, length=64)
    b = te.random_text_encoder(
        te.UMT5_TINY, placement="fp8", device="cpu", dtype=torch.float32, length=64
    )
    assert not any(isinstance(m, torch.nn.Linear) for m in b.model.modules())
    texts = ["a neon forest", "liquid chrome"]
    ea, eb = a.encode(texts), b.encode(texts)
    assert ((ea == 0) == (eb == 0)).all()
    assert (ea - eb).norm() / ea.norm() < 0.1
    t = te.time_encode(b, texts, repeats=2)  # the helper device timing scripts use
    assert t["n"] == 2 and 0 < t["min_ms"] <= t["median_ms"]


def test_tiny_text_encoder_is_deterministic_and_distinct():
    a = te.TinyTextEncoder(length=24, dim=32)
    b = te.TinyTextEncoder(length=24, dim=32)
    x = a.encode(["a neon forest", "a  neon   forest", "liquid chrome"])
    y = b.encode(["a neon forest"])
    assert x.shape == (3, 24, 32)
    assert torch.equal(x[0], y[0]) and torch.equal(x[0], x[1])
    assert (x[0] - x[2]).abs().max() > 0.1
    assert x[0, 4:].abs().max() == 0 and x[0, :4].norm(dim=-1).min() > 0  # 3 words + EOS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the encoder's own stream)")
def test_a_gpu_encode_does_not_wait_for_work_queued_on_the_default_stream():
    """A prompt change must not wait behind the denoising steps queued on the default
    stream (issue 15's latency): the encode runs on its own stream and returns while
    earlier default-stream work is still running, with the same embedding."""
    from engine.models.text_encoder import TinyTextEncoder

    enc = TinyTextEncoder(device="cuda")
    ref = enc.encode(["a red cube on a table"])
    torch.cuda.synchronize()
    busy_done = torch.cuda.Event()
    torch.cuda._sleep(int(3e9))  # ~2 s of GPU time queued on the default stream
    busy_done.record()
    out = enc.encode(["a red cube on a table"])
    assert not busy_done.query(), "the encode waited for the default stream's queue"
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.parametrize(("dim", "n_words"), [(32, 5), (64, 40), (30, 3)])
def test_tiny_umt5_is_transformers_umt5_on_the_same_weights(dim, n_words):
    """The tiny model's own UMT5 (no transformers import at run time) against the oracle:
    transformers' UMT5EncoderModel with our state dict, batched prompts of different
    lengths (the padding mask), more tokens than max_distance (the logarithmic buckets) and
    a width with one head (30)."""
    from transformers import UMT5EncoderModel

    enc = te.TinyTextEncoder(length=64, dim=dim, seed=7)
    spec = te.tiny_spec(dim)
    with torch.device("meta"):
        hf = UMT5EncoderModel(spec.hf_config())
    hf.to_empty(device="cpu").float()
    hf.load_state_dict(enc.model.state_dict())  # strict: the same parameter names
    hf.encoder.embed_tokens = hf.shared
    hf.eval()
    words = " ".join(f"w{i}" for i in range(n_words))
    texts = [words, "a neon forest", "x"]
    ids, lengths = enc.tokenizer(texts, 64)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ours = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()  # padded positions are zeroed by TextEncoder either way
    assert (ours[keep] - ref[keep]).abs().max() < 1e-5 * ref[keep].abs().max()
    # and the buckets themselves, against transformers' own function
    pos = torch.arange(70)
    rel = pos[None, :] - pos[:, None]
    attn = hf.encoder.block[0].layer[0].SelfAttention
    assert torch.equal(
        te._bucket(rel, spec.buckets, spec.max_distance), attn._relative_position_bucket(rel)
    )


def test_tiny_text_encoder_does_not_import_transformers():
    """The point of TinyUMT5: `dreamdeck run --model tiny` starts without transformers."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from engine.models.text_encoder import TinyTextEncoder as T; "
        "T(length=8, dim=16).encode(['a b']); print('transformers' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_building_the_tiny_encoder_draws_nothing_from_the_global_rng():
    """It is built on a thread beside the decoder, whose random build seeds and draws the
    global RNG (fork_rng): any draw here would interleave with it and change its weights
    from one build to the next."""
    from engine.models.text_encoder import TinyTextEncoder

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = TinyTextEncoder()
    assert torch.equal(torch.get_rng_state(), before)
    b = TinyTextEncoder()
    assert torch.equal(a.encode(["a red cube"]), b.encode(["a red cube"]))
