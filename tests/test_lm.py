"""The language model on the tiny config: cache semantics, streaming == full pass, layouts."""
import torch

from omni2.model import tokens as tk
from omni2.model.config import PRESETS
from omni2.model.generate import generate
from omni2.model.lm import KVCache, OmniLM
from omni2.model.prompt import audio_question, image_audio_question, step_ids, text_question


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    lm = OmniLM(PRESETS["tiny"]).eval()
    for p in lm.parameters():  # larger-than-init weights so logits are not all ties
        torch.nn.init.normal_(p, std=0.5)
    return lm


def reference_attention_forward(lm, x):
    """An independent full-sequence forward (no cache): plain causal attention with K/V
    expanded per head, written the straightforward way."""
    cfg = lm.cfg
    B, T, _ = x.shape
    cos, sin = lm.rope_cos[:T], lm.rope_sin[:T]
    for blk in lm.transformer.h:
        h = blk.norm_1(x)
        qkv = blk.attn.attn(h).view(B, T, cfg.n_query_groups, cfg.q_per_kv + 2, cfg.head_size)
        q = qkv[:, :, :, : cfg.q_per_kv].reshape(B, T, cfg.n_head, cfg.head_size).transpose(1, 2)
        k = qkv[:, :, :, cfg.q_per_kv].repeat_interleave(cfg.q_per_kv, dim=2).transpose(1, 2)
        v = qkv[:, :, :, cfg.q_per_kv + 1].repeat_interleave(cfg.q_per_kv, dim=2).transpose(1, 2)

        def rope(t):
            half = cfg.head_size // 2
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2)) / cfg.head_size ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + blk.attn.proj(y)
        x = x + blk.mlp(blk.norm_2(x))
    return lm.transformer.ln_f(x)


def test_cached_prefill_equals_independent_full_pass():
    lm = tiny_lm()
    prompt = audio_question(5)
    x = lm.embed(prompt.ids)
    T = prompt.length
    cache = KVCache.allocate(lm.cfg, rows=2, max_len=16)
    ours = lm(x, cache, None, torch.arange(T)[None].expand(2, T), span=T)
    ref = reference_attention_forward(lm, x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_step_by_step_decoding_equals_one_full_pass():
    lm = tiny_lm(1)
    prompt = audio_question(4)
    gen = generate(lm, prompt, lm.embed(prompt.ids), max_steps=12)
    assert len(gen.audio_tokens) >= 2
    # Rebuild the whole sequence (prompt + every fed-back step) and run it in one pass.
    fed = [step_ids(torch.tensor([a]), torch.tensor([t]))[0] for a, t in zip(gen.audio_tokens, gen.text_tokens)]
    seq = torch.cat([prompt.ids] + [f[:, :, None] for f in fed[:-1]], dim=2)
    T = seq.size(-1)
    cache = KVCache.allocate(lm.cfg, rows=2, max_len=T)
    hidden = lm(lm.embed(seq), cache, None, torch.arange(T)[None].expand(2, T), span=T)
    full_audio = lm.audio_logits(hidden[0]).argmax(-1)[prompt.length - 1 :]
    full_text = lm.text_logits(hidden[1]).argmax(-1)[prompt.length - 1 :]
    assert full_audio.tolist() == gen.audio_tokens
    # text tokens equal the argmax except where the end rule forced pad_t after eot
    for step, (t_full, t_gen) in enumerate(zip(full_text.tolist(), gen.text_tokens)):
        assert t_gen == t_full or (t_gen == tk.PAD_T and tk.EOT in gen.text_tokens[1:step])
    # logits agree within 1e-5 between the cached steps and the full pass
    cache2 = KVCache.allocate(lm.cfg, rows=2, max_len=T)
    P = prompt.length
    lm(lm.embed(seq[:, :, :P]), cache2, None, torch.arange(P)[None].expand(2, P), span=P)
    for i in range(P, T):
        h = lm(lm.embed(seq[:, :, i : i + 1]), cache2, None, torch.full((2, 1), i), span=i + 1)
        torch.testing.assert_close(lm.logits(h[:, 0]), lm.logits(hidden[:, i]), atol=1e-5, rtol=1e-5)


def test_decode_rows_at_different_positions_share_one_call():
    """Two turns at different positions stepped in one batch == each stepped alone."""
    lm = tiny_lm(2)
    cfg = lm.cfg
    pa, pb = audio_question(3), image_audio_question(2)
    cache = KVCache.allocate(cfg, rows=4, max_len=80)
    solo = []
    for rows, p in ((torch.tensor([0, 1]), pa), (torch.tensor([2, 3]), pb)):
        T = p.length
        lm(lm.embed(p.ids), cache, rows, torch.arange(T)[None].expand(2, T), span=T)
    ids = torch.randint(0, tk.TOTAL_VOCAB, (4, 8, 1))
    pos = torch.tensor([[pa.length]] * 2 + [[pb.length]] * 2)
    batched = lm(lm.embed(ids), cache, None, pos, span=pb.length + 1)
    for rows, p in ((torch.tensor([0, 1]), pa), (torch.tensor([2, 3]), pb)):
        c = KVCache.allocate(cfg, rows=2, max_len=80)
        T = p.length
        lm(lm.embed(p.ids), c, None, torch.arange(T)[None].expand(2, T), span=T)
        solo.append(lm(lm.embed(ids[rows]), c, None, torch.full((2, 1), T), span=T + 1))
    torch.testing.assert_close(batched, torch.cat(solo), atol=1e-5, rtol=1e-5)


def test_audio_question_layout():
    p = audio_question(3)
    rows = p.to_lists()
    a, A = tk, tk
    assert rows[0][0] == [a.INPUT_A, a.PAD_A, a.PAD_A, a.PAD_A, a.EOA, A.ANSWER_A]
    assert rows[1][6] == [a.INPUT_A, a.PAD_A, a.PAD_A, a.PAD_A, a.EOA, A.PAD_A]
    assert rows[0][7] == rows[1][7] == [tk.INPUT_T, tk.PAD_T, tk.PAD_T, tk.PAD_T, tk.EOT, tk.ANSWER_T]
    assert p.audio_start == 1 and p.audio_len == 3 and p.image_start is None
    # global ids: layer a of local x is 152000 + 4160 a + x
    assert p.ids[0, 3, 0].item() == 152000 + 4160 * 3 + tk.INPUT_A


def test_image_audio_question_layout():
    L = 4
    p = image_audio_question(L)
    assert p.length == L + 55
    rows = p.to_lists()
    want = [tk.IMAGE] + [tk.PAD_A] * 50 + [tk.EOIMAGE, tk.INPUT_A] + [tk.PAD_A] * L + [tk.EOA]
    for layer in range(7):
        assert rows[0][layer] == want + [tk.ANSWER_A]
        assert rows[1][layer] == want + [tk.PAD_A]
    assert rows[0][7] == [tk.PAD_T] * (L + 54) + [tk.ANSWER_T]
    assert p.image_start == 1  # CLIP features at 1..50
    assert p.audio_start == 52  # whisper at 52..51+L: the released one-position shift
    assert rows[0][0][52] == tk.INPUT_A  # ... which covers input_a


def test_text_question_layout():
    p = text_question([11, 12])
    rows = p.to_lists()
    assert rows[0][7] == [tk.INPUT_T, 11, 12, tk.EOT, tk.ANSWER_T]
    assert rows[0][2] == [tk.PAD_A] * 4 + [tk.ANSWER_A]
    assert rows[1][2] == [tk.PAD_A] * 5


def test_features_replace_audio_streams_but_keep_text():
    lm = tiny_lm(3)
    p = audio_question(2)
    feats = torch.randn(2, 2, lm.cfg.n_embd)
    x = lm.embed(p.ids, ((feats, p.audio_start),))
    text_emb = lm.transformer.wte(p.ids[:, tk.TEXT_STREAM])
    torch.testing.assert_close(x[:, 1:3], (7 * feats + text_emb[:, 1:3]) / 8, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x[:, 0], lm.embed(p.ids)[:, 0])


def test_end_rules_force_pad_after_eot_and_stop_on_layer6_eoa():
    from omni2.model.generate import EndRules

    r = EndRules()
    assert r.apply(0, [0] * 6 + [tk.EOA], tk.EOT) == (False, tk.EOT)  # step 0 unchecked
    assert r.apply(1, [1] * 7, tk.EOT) == (False, tk.EOT)
    assert r.apply(2, [1] * 7, 5) == (False, tk.PAD_T)
    assert r.apply(3, [tk.EOA] * 6 + [2], 5) == (False, tk.PAD_T)  # only layer 6 ends a turn
    assert r.apply(4, [2] * 6 + [tk.EOA], 5)[0] is True


def test_sampling_per_row_parameters():
    from omni2.model.sampling import sample

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50)
    g = torch.Generator().manual_seed(0)
    greedy = sample(logits, torch.zeros(3), torch.ones(3, dtype=torch.long), torch.ones(3), g)
    assert torch.equal(greedy, logits.argmax(-1))
    mixed = sample(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1, 5, 0]), torch.tensor([1.0, 1.0, 0.5]), g)
    assert mixed.shape == (3, 7)
    assert torch.equal(mixed[0], logits[0].argmax(-1))  # greedy row untouched
    top5 = logits[1].topk(5).indices
    assert all(int(mixed[1, j]) in top5[j].tolist() for j in range(7))  # top-k respected
    text = sample(torch.randn(2, 100), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2), g)
    assert text.shape == (2,)
