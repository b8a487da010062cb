"""Text encoder: our UMT5, Wan checkpoint names, transformers folders, tokenisation,
zeroing, fp8, the tiny stand-in.

Oracles: transformers' UMT5EncoderModel on the same weights (float32, and bf16 against a
float32 reference); a slow functional forward of Wan's T5 structure written here (so a
swapped gate/fc1 map fails even though the round trip through our own inverse map would
not); transformers' tokenizer and sentencepiece itself for tokenisation.
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


def _train_spm(vocab_size: int, **options) -> bytes:
    """A sentencepiece model trained here on CORPUS, with T5's special ids (pad 0, eos 1,
    unk 2, no bos); the serialised model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A real sentencepiece model trained here, laid out like `google/umt5-xxl` (spiece.model
    + tokenizer_config.json), plus a transformers tokenizer.json folder built from it."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tok")
    sp_dir = d / "sp"
    sp_dir.mkdir()
    (sp_dir / "spiece.model").write_bytes(_train_spm(200))
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
    assert isinstance(hf_tok, te.JsonTokenizer)  # tokenizer.json: no transformers import
    sp_tok = te.SentencePieceTokenizer(sp_dir / "spiece.model")
    tf_tok = te.HFTokenizer(hf_dir)  # transformers' own, the oracle
    texts = [te.clean_text(t) for t in CORPUS[:4]]
    ids_a, len_a = hf_tok(texts, 512)
    ids_b, len_b = sp_tok(texts, 512)
    ids_c, len_c = tf_tok(texts, 512)
    assert torch.equal(ids_a, ids_b) and torch.equal(len_a, len_b)
    assert torch.equal(ids_a, ids_c) and torch.equal(len_a, len_c)
    for i, t in enumerate(texts):  # sentencepiece's own pieces, then EOS, then padding
        expect = sp.encode(t) + [1]
        assert ids_b[i, : len_b[i]].tolist() == expect
        assert (ids_b[i, len_b[i] :] == 0).all()
    long = " ".join(["neon forest glowing mushrooms"] * 400)
    for tok in (hf_tok, sp_tok, tf_tok):
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
    """Our UMT5 (no transformers import at run time) against the oracle:
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
    """The point of our UMT5: `dreamdeck run --model tiny` starts without transformers."""
    from helpers import imports_in_fresh_process

    code = (
        "from engine.models.text_encoder import TinyTextEncoder as T\n"
        "T(length=8, dim=16).encode(['a b'])"
    )
    assert not imports_in_fresh_process(code, "transformers")


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


# --- our encoder at every size: bf16, transformers folders, no transformers import -----------


def _padded_batch(vocab: int, lengths: list[int], seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), n), generator=g)
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0 past each length


def _ours_from(hf) -> te.UMT5Encoder:
    """Our encoder holding transformers' weights (strict: the same names and shapes)."""
    spec = te.UMT5Spec(
        vocab=hf.config.vocab_size,
        dim=hf.config.d_model,
        dim_ffn=hf.config.d_ff,
        heads=hf.config.num_heads,
        layers=hf.config.num_layers,
        buckets=hf.config.relative_attention_num_buckets,
        max_distance=hf.config.relative_attention_max_distance,
        head_dim=hf.config.d_kv,
    )
    ours = te.UMT5Encoder(spec)
    ours.load_state_dict(hf.state_dict())
    return ours.tie_().eval()


def test_umt5_equals_transformers_in_float32_with_a_head_width_apart_from_dim(hf_model):
    """T5 allows heads * d_kv != d_model; and the padded batch runs past max_distance."""
    from transformers import UMT5EncoderModel

    spec = te.UMT5Spec(vocab=256, dim=24, dim_ffn=40, heads=3, layers=2, buckets=8, max_distance=16)
    torch.manual_seed(5)
    cfg = spec.hf_config()
    cfg.d_kv = 12  # inner width 36, not 24
    hf = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in n:
                p.normal_(0, 0.5)
    ours = _ours_from(hf)
    assert ours.spec.kv_dim == 12
    ids, mask = _padded_batch(256, [40, 7, 1])
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-5 * b[keep].abs().max()


def test_umt5_in_bf16_is_as_close_to_float32_as_transformers_bf16(hf_model):
    """bf16 the way transformers computes it. Both bf16 runs are measured against the float32
    output of the same weights (rounded to bf16 first, so only the arithmetic differs).
    Ours may be no further from it than transformers' own bf16 error x 1.5, and the two
    bf16 outputs must agree to half that error: they run the same op sequence (float32 mean
    square, cast back before the scale, unscaled logits, op-by-op tanh GELU), so only
    kernel accumulation order may differ, far below bf16's own rounding error. Computing
    the norm's mean square in bf16, for one, moves ours from transformers by more than
    that error (checked when this test was written)."""
    ids, mask = _padded_batch(SPEC.vocab, [23, 9, 1, 17])
    keep = mask.bool()
    hf16 = copy_model(hf_model).to(torch.bfloat16)
    ref = copy_model(hf16).float()  # bf16-rounded weights, float32 arithmetic
    ours = _ours_from(hf_model).to(torch.bfloat16)
    assert ours.encoder.embed_tokens is ours.shared
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
        h = hf16(input_ids=ids, attention_mask=mask).last_hidden_state
        o = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert o.dtype == h.dtype == torch.bfloat16
    h, o = h[keep].float(), o[keep].float()
    err_hf = (h - r).norm() / r.norm()
    err_ours = (o - r).norm() / r.norm()
    assert 0 < err_hf < 0.05  # bf16 did round: the comparison means something
    assert err_ours <= 1.5 * err_hf, (err_ours, err_hf)
    assert (o - h).norm() / r.norm() <= 0.5 * err_hf


def copy_model(m):
    import copy

    return copy.deepcopy(m).eval()


def test_wan_pth_and_transformers_folder_give_the_same_embeddings(tmp_path, tok_dir, hf_model):
    """The real file formats: Wan's .pth, and transformers' `save_pretrained` (sharded, and in
    one file) of the same weights, each loaded without transformers, equal to each other
    and to transformers' own model."""
    sp_dir, hf_dir, _ = tok_dir
    pth = tmp_path / "t5.pth"
    torch.save(to_wan(hf_model), pth)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    hf_model.save_pretrained(str(sharded), max_shard_size="20KB")
    hf_model.save_pretrained(str(single))
    assert (sharded / "model.safetensors.index.json").is_file()
    assert (single / "model.safetensors").is_file()
    texts = ["a neon forest at night", "liquid chrome sculptures melting in slow motion"]
    outs = [
        te.load_text_encoder(w, hf_dir, placement="cpu", dtype=torch.float32).encode(texts)
        for w in (pth, sharded, single)
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    enc = te.load_text_encoder(sharded, hf_dir, placement="cpu", dtype=torch.float32)
    assert isinstance(enc.model, te.UMT5Encoder) and enc.model.spec == SPEC
    ids, lengths = enc.tokenizer([te.clean_text(t) for t in texts], 512)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        oracle = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    torch.testing.assert_close(outs[1][:, : ids.shape[1]], oracle, rtol=1e-4, atol=1e-5)
    # bf16 and fp8 placements of the folder build too
    b16 = te.load_text_encoder(sharded, hf_dir, placement="cpu").encode(texts)
    f8 = te.load_text_encoder(sharded, hf_dir, placement="fp8", device="cpu").encode(texts)
    assert b16.dtype == f8.dtype == torch.bfloat16
    for x in (b16, f8):
        # the same positions zeroed (per position: a bf16 element may cancel to 0 by itself)
        assert torch.equal(x.float().norm(dim=-1) == 0, outs[0].norm(dim=-1) == 0)
        assert (x.float() - outs[0]).norm() / outs[0].norm() < 0.1


def test_bad_transformers_folders_give_clear_errors(tmp_path, hf_model):
    import json

    good = tmp_path / "good"
    hf_model.save_pretrained(str(good), max_shard_size="20KB")
    cfg = json.loads((good / "config.json").read_text())
    index = json.loads((good / "model.safetensors.index.json").read_text())

    def variant(name, *, config=None, drop=(), extra=None, shape=None, truncate=None):
        import shutil

        from safetensors.torch import load_file, save_file

        d = tmp_path / name
        shutil.copytree(good, d)
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        for f in sorted(set(index["weight_map"].values())):
            sd = load_file(str(d / f))
            if any(k in sd for k in drop) or (extra and f == extra[0]) or (shape and shape in sd):
                sd = {k: v for k, v in sd.items() if k not in drop}
                if extra and f == extra[0]:
                    sd[extra[1]] = torch.zeros(3)
                if shape in sd:
                    sd[shape] = torch.zeros(sd[shape].shape[0] + 1, *sd[shape].shape[1:])
                save_file(sd, str(d / f))
        if truncate:
            path = d / truncate
            path.write_bytes(path.read_bytes()[:-100])
        return d

    first = sorted(set(index["weight_map"].values()))[0]
    q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"
    cases = [
        (variant("no_cfg_key", config={k: v for k, v in cfg.items() if k != "d_ff"}), "d_ff"),
        (variant("relu", config={**cfg, "feed_forward_proj": "relu"}), "gated-gelu"),
        (variant("t5", config={**cfg, "model_type": "t5"}), "model_type"),
        (variant("bad_int", config={**cfg, "num_heads": "4"}), "num_heads"),
        (variant("wrong_size", config={**cfg, "d_ff": SPEC.dim_ffn + 8}), "shape"),
        (variant("unknown", extra=(first, "decoder.block.0.x")), "decoder.block.0.x"),
        (variant("missing", drop=(q0,)), q0),
        (variant("shape", shape=q0), q0),
        (variant("truncated", truncate=first), "truncated"),
    ]
    for folder, what in cases:
        with pytest.raises(WeightsError, match=what) as e:
            te.load_umt5_folder(folder)
        assert folder.name in str(e.value), e.value  # names the folder or its file
    (tmp_path / "no_cfg").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        te.load_umt5_folder(tmp_path / "no_cfg")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="model.safetensors"):
        te.load_umt5_folder(no_weights)
    lost = variant("lost_shard")
    (lost / first).unlink()
    with pytest.raises(WeightsError, match="not found"):
        te.load_umt5_folder(lost)
    # the index is outside data too: a shard name that leaves the folder, or one that is a
    # FIFO (reading it would block the load forever), is refused before anything is read
    import os

    for name, shard in (("escape", "../good/" + first), ("dotdot", ".."), ("fifo", "pipe")):
        d = variant(f"index_{name}")
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"] = {k: shard for k in idx["weight_map"]}
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        if name == "fifo":
            os.mkfifo(d / "pipe")
        with pytest.raises(WeightsError, match="shard") as e:
            te.load_umt5_folder(d)
        assert "model.safetensors.index.json" in str(e.value)
    # sanity: the unmodified folder loads
    assert te.load_umt5_folder(good).spec == SPEC


def test_json_tokenizer_matches_transformers_on_a_tokenizers_built_file(tmp_path, tok_dir):
    """A tokenizer.json written with the `tokenizers` library as older converters wrote them
    (Metaspace alone, no post-processor, a normaliser transformers drops, truncation and
    padding baked in): ours gives transformers' ids and lengths, EOS appended."""
    import json

    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    _, _, sp = tok_dir
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.enable_truncation(8)
    tok.enable_padding(length=40)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "extra_ids": 0,
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )
    ours = te.load_tokenizer(d)
    assert isinstance(ours, te.JsonTokenizer)
    oracle = te.HFTokenizer(d)
    texts = [te.clean_text(t) for t in CORPUS] + ["A Neon ﬁre", "x </s> y", "Ünïcode ½"]
    long = " ".join(CORPUS * 30)
    for batch, n in ((texts, 512), (texts, 6), ([long, "a cat"], 512), (["a"], 1)):
        a, la = ours(batch, n)
        b, lb = oracle(batch, n)
        assert torch.equal(a, b) and torch.equal(la, lb), (batch, n)
        assert (a[torch.arange(len(batch)), la - 1] == 1).all()  # EOS last


def test_full_size_path_does_not_import_transformers(tmp_path, tok_dir, hf_model):
    """Issue 15: building the real encoder (Wan .pth, transformers folder, random weights)
    and the tokenizer from tokenizer.json must not import transformers (seconds of CPU
    beside the transformer's load)."""
    from helpers import imports_in_fresh_process

    _, hf_dir, _ = tok_dir
    pth = tmp_path / "t5.pth"
    torch.save(to_wan(hf_model), pth)
    folder = tmp_path / "folder"
    hf_model.save_pretrained(str(folder), max_shard_size="20KB")
    code = (
        "import torch\n"
        "from engine.models import text_encoder as te\n"
        f"for w in ({str(pth)!r}, {str(folder)!r}):\n"
        f"    e = te.load_text_encoder(w, {str(hf_dir)!r}, placement='cpu')\n"
        "    assert isinstance(e.tokenizer, te.JsonTokenizer)\n"
        "    assert e.encode(['a neon forest']).abs().sum() > 0\n"
        f"spec = te.UMT5Spec(**{SPEC.__dict__!r})\n"
        "te.random_text_encoder(spec, placement='cpu', length=16).encode(['a b'])\n"
    )
    assert not imports_in_fresh_process(code, "transformers", timeout=300)


def test_json_tokenizer_keeps_the_files_byte_fallback_as_sentencepiece_does(tmp_path):
    """UMT5's sentencepiece model falls back to byte pieces (<0xE7>...) for characters not in
    its vocabulary; a tokenizer.json converted from it says `byte_fallback: true`, and Wan
    encoded its prompts with that file as is (transformers 4's fast tokenizer). Ours keeps the
    flag (transformers 5's T5Tokenizer rebuilds the model without it, giving <unk>): the ids
    are sentencepiece's own, plus EOS, for text outside the vocabulary too."""
    import json

    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram

    sp = spm.SentencePieceProcessor(model_proto=_train_spm(400, byte_fallback=True))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert "<0xE7>" in dict(vocab)  # the byte pieces exist
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=True))
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    ours = te.load_tokenizer(d)
    assert isinstance(ours, te.JsonTokenizer)
    # NFKC-stable text (the file has no charsmap): CJK, a snowman, an emoji, Cyrillic
    texts = ["a neon 猫 city ☃", "🦋 butterflies", "город at night", "glass ☃☃ fire"]
    ids, lengths = ours(texts, 512)
    for i, text in enumerate(texts):
        want = sp.encode(text) + [1]
        assert ids[i, : lengths[i]].tolist() == want, (text, [sp.id_to_piece(j) for j in want])
        assert 2 not in want  # no <unk>: every character became pieces or bytes
