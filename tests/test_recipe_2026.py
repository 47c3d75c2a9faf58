"""Tests of the 2026-08 recipe's techniques in train_gpt.py: schedule, optimizer math, losses, model variants. CPU."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

BOS = tg.BOS_ID


def tiny_args(**overrides) -> tg.Hyperparameters:
    """The 2026-08 recipe at 6 layers of width 64, with every technique on: paired heads (0), XSA (1, 2, 4), key
    offset and gated attention (2, 5), the skip 1>3 into the layer without attention, layers 4-5 reading layer 3's
    stream, MUDD and DC on the last layer."""
    base = dict(tg.PRESETS["smoke"], model_dim=64, num_heads=2, head_dim=32, mlp_hidden=128, block_size=16,
                dc_window=12, train_seq_len="64", max_doc_len="64", val_seq_len=64, val_tokens=256,
                windows_per_step=4, window_blocks="1/2,2/3,2/4,3/5", final_window_blocks=6, bigram_vocab_size=1024,
                bigram_sign_rows=64, mudd_hidden=16, num_iterations=9, extension_iterations=2)
    return tg.Hyperparameters(**{**base, **overrides})


def randomized(model: tg.GPT, seed: int = 0) -> tg.GPT:
    """Zero-initialized weights (c_proj, bigram table, second layers of the small MLPs) would hide most bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "b2" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "w2" in name or "gate" in name else 0.1))
    return model


def documents(length: int, starts: list[int], seed: int = 0) -> torch.Tensor:
    seq = torch.randint(0, 50000, (length,), generator=torch.Generator().manual_seed(seed))
    seq[starts] = BOS
    return seq


def set_plan(model: tg.GPT, args: tg.Hyperparameters, step: int) -> tg.GPT:
    model.set_step(tg.plan_step(step, args))
    return model


# ----------------------------------------------------------------------------- schedule


def test_the_2026_schedule_has_the_recipes_numbers():
    args = tg.parse_args([])
    plans = tg.full_schedule(args)
    assert len(plans) == 1286 and plans[-1].step == 1285
    assert tg.stage_starts(args) == [0, 423, 847, 1270]
    assert sum(p.tokens for p in plans[:-1]) == 338_821_120
    by_stage = {s: [p for p in plans[:-1] if p.stage == s] for s in range(4)}
    assert [len(v) for v in by_stage.values()] == [423, 424, 423, 15]
    assert [(v[0].tokens, v[0].seq_len, v[0].max_doc_len) for v in by_stage.values()] == [
        (131_072, 16_384, 896), (262_144, 32_768, 2048), (393_216, 49_152, 2048), (393_216, 49_152, 2048)]
    assert [(v[0].window_short, v[0].window_long) for v in by_stage.values()] == [(1, 3), (3, 7), (5, 11), (6, 13)]
    assert (plans[-1].window_short, plans[-1].window_long) == (6, 20)  # the final validation looks further back
    lr = [p.lr for p in plans]
    assert lr[0] == lr[422] == 1.0 and lr[423] == lr[508] == pytest.approx(1.52)
    assert lr[846] == pytest.approx(0.912, abs=5e-4) and lr[847] == pytest.approx(1.027, abs=5e-4)
    assert lr[1269] == pytest.approx(0.152, abs=5e-4) and lr[1270] == lr[1284] == pytest.approx(0.15)
    momentum = [p.muon_momentum for p in plans]
    assert momentum[0] == pytest.approx(0.85) and momentum[150] == pytest.approx(0.9)
    assert momentum[300] == momentum[1235] == pytest.approx(0.95) and momentum[1284] == pytest.approx(0.852)
    assert [p.step for p in plans if p.validate] == [0, 250, 500, 750, 1000, 1250, 1285]
    assert all(p.adam_step == (p.step % 2 == 1) for p in plans)
    assert [p.step for p in plans if p.untie] == [847] and all(p.tied == (p.step <= 847) for p in plans)
    assert plans[0].loss_weights == (1.0, 0.5, 0.25) and plans[422].loss_weights[2] == pytest.approx(0.25 / 423)
    assert plans[423].loss_weights == (1.0, 0.5) and plans[847].loss_weights == (1.0,)
    assert [p.prefix_weight for p in (plans[0], plans[423], plans[847])] == [0.25, 0.25, 0.0]
    assert plans[846].prefix_weight == pytest.approx(0.25 / 424) and not plans[847].use_prefix


def test_print_schedule_needs_no_data(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--print_schedule", "--val_every=500"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "DATA_PATH": "/nowhere"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1286 and list(tmp_path.iterdir()) == []
    for key in ("step", "tokens", "lr", "muon_momentum", "window_short_blocks", "window_long_blocks", "max_doc_len",
                "validate"):
        assert key in lines[0]
    assert sum(line["tokens"] for line in lines) == 338_821_120
    assert [line["step"] for line in lines if line["validate"]] == [0, 500, 1000, 1285]


def test_warmup_covers_every_stage_change():
    assert tg.warmup_steps(tg.parse_args([])) == [0, 1, 421, 422, 423, 424, 845, 846, 847, 848, 1268, 1269, 1270,
                                                 1271]
    assert tg.warmup_steps(tg.parse_args(["--preset=record_2025_08_23"])) == list(range(10))


# ----------------------------------------------------------------------------- optimizers


def muon_for(p: torch.nn.Parameter, args: tg.Hyperparameters) -> tg.Muon:
    ortho = lambda G: tg.orthogonalize(G, args.orthogonalizer, args.orthogonalizer_steps, torch.float32)
    return tg.Muon([(p, lambda t: t, 1.0)], args, ortho, grad_scale=1.0)


def test_normuon_with_cautious_weight_decay_is_the_plain_formula():
    args = tiny_args(dtype="float32", muon_lr=0.05, muon_weight_decay=1.2)
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(2, 24, 16, generator=gen))
    start = p.detach().clone()
    opt = muon_for(p, args)
    grads = [torch.randn(2, 24, 16, generator=gen) for _ in range(3)]
    plan = dataclasses.replace(tg.plan_step(0, args), lr=0.7, muon_momentum=0.9)
    for g in grads:
        p.grad = g.clone()
        opt.step(plan)
    x, buf, moment = start.clone(), torch.zeros_like(start), torch.zeros(2, 24, 1)
    lr = 0.05 * 0.7
    for g in grads:  # by hand
        buf = 0.9 * buf + 0.1 * g
        V = tg.orthogonalize(0.1 * g + 0.9 * buf, "polar_express", 5, torch.float32)
        moment = 0.9 * moment + 0.1 * V.square().mean(dim=-1, keepdim=True)  # tall: one statistic per row
        U = V / moment.sqrt()
        U = U * V.norm(dim=(-2, -1), keepdim=True) / U.norm(dim=(-2, -1), keepdim=True)
        x = x - lr * 1.2 * lr * (U * x >= 0) * x - lr * U  # decay ~ lr^2, only where the update shrinks |x|
    torch.testing.assert_close(p.detach(), x, rtol=1e-5, atol=1e-6)


def test_mantissa_bits_make_bf16_weights_follow_the_fp32_update_exactly():
    args = tiny_args(dtype="float32", muon_lr=0.02)
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(3, 16, 32, generator=gen).bfloat16()
    p16, p32 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.float())
    opts = [muon_for(p16, args), muon_for(p32, args)]
    plan = dataclasses.replace(tg.plan_step(0, args), lr=1.0, muon_momentum=0.9)
    for _ in range(4):
        g = torch.randn(3, 16, 32, generator=gen).bfloat16().float()  # the same gradient in both dtypes
        for p, opt in zip((p16, p32), opts):
            p.grad = g.clone().to(p.dtype)
            opt.step(plan)
    master = tg.join_mantissa(p16.detach(), opts[0].state[0]["mantissa"])
    assert torch.equal(master, p32.detach())  # the bf16 weight and its 16 extra bits are the fp32 weight
    assert torch.equal(p16.detach(), tg.split_mantissa(p32.detach())[0])
    assert not torch.equal(p16.detach().float(), p32.detach())  # bf16 alone would have lost the small updates
    x = torch.randn(1000, generator=gen)
    assert torch.equal(tg.join_mantissa(*tg.split_mantissa(x)), x)


def adam(params, args, **kwargs):
    return tg.DistAdam([("x", params, 1.0, (0.5, 0.95), 1.0)], args, grad_scale=1.0, **kwargs)


def test_adam_steps_on_odd_steps_with_the_summed_gradients():
    args = tiny_args(adam_weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    p, q = torch.nn.Parameter(torch.randn(8, 4, generator=gen)), torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    q.data.copy_(p.data)
    every_other, every = adam([p], args), adam([q], dataclasses.replace(args, adam_every=1))
    g0, g1 = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    for step, g in enumerate((g0, g1)):
        p.grad = g.clone() if p.grad is None else p.grad + g  # autograd accumulates into the kept gradient
        every_other.step(tg.plan_step(step, args))
        assert (p.grad is not None) == (step == 0)
    q.grad = g0 + g1
    every.step(dataclasses.replace(tg.plan_step(1, args), adam_step=True))
    assert torch.equal(p.detach(), q.detach()) and every_other.state[0]["step"] == 1


def test_tied_embedding_updates_as_one_then_parts_with_the_heads_moments():
    args = tiny_args(adam_weight_decay=0.0)
    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Parameter(torch.randn(16, 8, generator=gen))
    embed = torch.nn.Parameter(head.detach().clone())
    opt = tg.DistAdam([("h", [head], 1.0, (0.5, 0.95), 0.0), ("e", [embed], 1.0, (0.5, 0.95), 0.0)], args, 1.0,
                      tied=(head, embed))
    reference = torch.nn.Parameter(head.detach().clone())  # one tensor that gets both gradients
    ref_opt = adam([reference], args)
    plans = [dataclasses.replace(tg.plan_step(1, args), tied=True, untie=False),
             dataclasses.replace(tg.plan_step(1, args), tied=True, untie=True)]
    for plan in plans:
        g_head, g_embed = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
        head.grad, embed.grad, reference.grad = g_head.clone(), g_embed.clone(), g_head + g_embed
        opt.step(plan)
        ref_opt.step(plan)
        assert torch.equal(head.detach(), reference.detach()) and torch.equal(embed.detach(), head.detach())
    assert torch.equal(opt.state[1]["exp_avg"], opt.state[0]["exp_avg"]) and opt.state[1]["step"] == 2
    untied = dataclasses.replace(tg.plan_step(1, args), tied=False, untie=False)
    head.grad, embed.grad = torch.randn(16, 8, generator=gen), torch.zeros(16, 8)
    opt.step(untied)
    assert not torch.equal(head.detach(), embed.detach())


def test_adam_cautious_weight_decay_only_where_the_update_shrinks_the_weight():
    args = tiny_args(adam_lr=0.1, adam_weight_decay=0.5)
    p = torch.nn.Parameter(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))
    opt = tg.DistAdam([("x", [p], 2.0, (0.0, 0.0), 3.0)], args, grad_scale=1.0)
    p.grad = torch.tensor([[1.0, -1.0, -1.0, 1.0]])  # same sign as p: the update shrinks |p| in the first two
    opt.step(dataclasses.replace(tg.plan_step(1, args), lr=1.0))
    lr = 0.1 * 2.0
    decay = lr**2 * 0.5 * 3.0
    expected = torch.tensor([[1 - lr - decay, -1 + lr + decay, 1 + lr, -1 - lr]])
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- losses and data


def test_multi_token_and_prefix_losses_on_a_hand_made_sequence():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(5, 11, generator=gen)
    targets = torch.tensor([3, 7, 1, 9, 4])
    prefixes = torch.tensor([-1, 2, -1, 5, 0])
    weights = torch.tensor([1.0, 0.5, 0.25, 0.125])
    loss = tg.prediction_loss(z, targets, weights, 3, prefixes)
    lp = z.log_softmax(-1)
    expected = -(lp[[0, 1, 2, 3, 4], [3, 7, 1, 9, 4]].sum()  # next token
                 + 0.5 * lp[[0, 1, 2, 3], [7, 1, 9, 4]].sum()  # the one after: positions that have it
                 + 0.25 * lp[[0, 1, 2], [1, 9, 4]].sum()
                 + 0.125 * lp[[1, 3, 4], [2, 5, 0]].sum())  # prefix targets where there is one
    torch.testing.assert_close(loss, expected)
    plain = tg.prediction_loss(z, targets, torch.tensor([1.0]), 1, None)
    assert torch.equal(plain, F.cross_entropy(z, targets, reduction="sum"))


def test_prefix_table_names_the_longest_proper_prefix_token():
    sys.path.insert(0, str(ROOT / "data"))
    from gpt2_tokenizer import get_encoding

    enc = get_encoding()
    table = tg.prefix_token_table(50304)
    assert table.shape == (50304,) and table[BOS] == -1 and (table[50257:] == -1).all()
    assert (table[[enc.encode_single_token(bytes([b])) for b in range(256)]] == -1).all()  # single bytes
    for text in ("Hello", " world", " the", "ing", " Transformer", "1234"):
        for token in enc.encode_ordinary(text):
            raw = enc.decode_single_token_bytes(token)
            shorter = [raw[:n] for n in range(len(raw) - 1, 0, -1)]
            expected = next((enc.encode_single_token(b) for b in shorter if _is_token(enc, b)), -1)
            assert table[token] == expected, (text, raw)
    assert table[enc.encode_single_token(b" the")] == enc.encode_single_token(b" th")


def _is_token(enc, raw: bytes) -> bool:
    try:
        enc.encode_single_token(raw)
        return True
    except KeyError:
        return False


def test_bigram_hash_and_sign_rows_on_a_hand_made_sequence():
    args = tiny_args(bigram_vocab_size=377_280)
    model = tg.GPT(args)
    with torch.no_grad():
        model.bigram_embed.weight.copy_(torch.arange(377_280).float()[:, None].expand(-1, 64))  # row r holds r
        model.bigram_signs.fill_(1.0)
    x = torch.tensor([BOS, 17, 50255, 3, 3])
    rows = model.bigram(x)[0, :, 0].long().tolist()
    M = 377_279  # by hand, in int32 arithmetic as numpy does it; position 1 reads the reserved row as predecessor
    x32 = x.numpy().astype(np.int32)
    prev = np.array([M, M, 17, 50255, 3], dtype=np.int32)
    with np.errstate(over="ignore"):
        expected = ((np.int32(36313) * x32) ^ (np.int32(27191) * prev)) % M
    expected[0] = M
    assert rows == expected.tolist() and expected[1] != (36313 * 17 ^ 27191 * M) % M  # the product wrapped
    signs = torch.tensor([1.0, -1.0]).repeat(32)[:, None].expand(-1, 64)
    model.bigram_signs.copy_(signs)
    out = model.bigram(x)[0, :, 0]
    sign_rows = [0] + [(a ^ b) % 64 for a, b in zip(x.tolist(), x.tolist()[1:])]
    assert out.tolist() == [r * (1 if s % 2 == 0 else -1) for r, s in zip(rows, sign_rows)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bigram_embedding_gradient_sums_each_row_in_fp32_and_rounds_once(dtype):
    """SummedRowsEmbedding (the bigram table's lookup): F.embedding's output; its gradient is each row's fp32 sum over
    the tokens that read it (repeated rows, in token order), rounded once to the weight's dtype: bit for bit the fp32
    scatter-add then cast that F.embedding's backward computes compiled, and in fp32 its eager gradient too."""
    gen = torch.Generator().manual_seed(0)
    V, D, T = 1000, 64, 4096
    weight = torch.randn(V, D, generator=gen).to(dtype)
    rows = torch.randint(0, V, (T,), generator=gen)
    rows[::97] = 7  # one row read 43 times
    grad = torch.randn(T, D, generator=gen).to(dtype)
    w = weight.clone().requires_grad_()
    out = tg.SummedRowsEmbedding.apply(w, rows)
    out.backward(grad)
    assert torch.equal(out, F.embedding(rows, weight))
    expected = torch.zeros(V, D)
    for t in range(T):  # fp32 sums in token order (a CPU scatter-add may sum in another order)
        expected[rows[t]] += grad[t].float()
    assert w.grad.dtype == dtype and torch.equal(w.grad, expected.to(dtype))
    plain = weight.clone().requires_grad_()
    F.embedding(rows, plain).backward(grad)  # on a CPU in bf16 it sums in bf16, rounding at every add
    assert torch.equal(w.grad, plain.grad) if dtype == torch.float32 else not torch.equal(w.grad, plain.grad)
    # tg.embedding takes this backward where the table has at least twice as many rows as there are tokens
    backward = lambda n: type(tg.embedding(weight[:n].clone().requires_grad_(), rows[:500] % 8).grad_fn).__name__
    assert (backward(1000), backward(999)) == ("SummedRowsEmbeddingBackward", "EmbeddingBackward0")


SPARSE_EXCHANGE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, train_gpt as tg
tg.dist.init_process_group("gloo")
r, W = tg.dist.get_rank(), tg.dist.get_world_size()
sent, a2a = [], tg.dist.all_to_all_single
tg.dist.all_to_all_single = lambda out, inp, *a, **k: (sent.append(inp.shape[0]), a2a(out, inp, *a, **k))[1]
def grad_of(rank, dtype):  # a few rows per rank; row 1 on every rank, row 4 on none, rank 1 sends nothing
    g = torch.zeros(6 * W, 3, dtype=dtype)
    if rank != 1:
        rows = torch.tensor([1, 2 * rank + 3, 6 * W - 1 - rank])
        g[rows] = torch.randn(3, 3, generator=torch.Generator().manual_seed(rank)).to(dtype)
    return g
out = {}
for dtype in (torch.float32, torch.bfloat16):
    shard, handle = tg.sparse_reduce_scatter(grad_of(r, dtype), r, W)
    handle.wait()
    want = torch.zeros(6 * W, 3)
    for rank in range(W):  # the fp32 sum in rank order, of the gradients as they are
        want += grad_of(rank, dtype).float()
    out[str(dtype)] = torch.equal(shard, want.chunk(W)[r]) and shard.dtype == torch.float32
out["rows_sent"] = sent[1::3]
json.dump(out, open(sys.argv[2] + str(r), "w"))
tg.dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sparse_reduce_scatter_sends_only_nonzero_rows_and_sums_them_in_fp32(tmp_path, world_size):
    script = tmp_path / "exchange.py"
    script.write_text(SPARSE_EXCHANGE)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    result = subprocess.run(torchrun + [str(script), str(ROOT), str(tmp_path / "rank")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(world_size):
        out = json.loads((tmp_path / f"rank{rank}").read_text())
        assert out["torch.float32"] and out["torch.bfloat16"], out
        assert out["rows_sent"] == [0 if rank == 1 else 3] * 2  # its nonzero rows, in both dtypes


def test_yarn_scales_the_attention_and_slows_the_slow_frequencies():
    rotary = tg.GPT(tg.parse_args(["--preset=smoke"])).rotary  # tiny shapes, windows in 64-token blocks
    full = tg.Rotary(tg.parse_args([]), [384, 896, 1408, 1664, 1664])
    assert full.scales.tolist() == pytest.approx([0.1, 0.11695, 0.12752, 0.13178, 0.13178], abs=5e-6)
    f0, f1 = full.freqs[0], full.freqs[1]
    turns = 384 * f0 / (2 * math.pi)
    assert torch.equal(f1[turns >= 32], f0[turns >= 32])  # fast dims keep their speed
    slow = (turns <= 1) & (f0 > 0)
    torch.testing.assert_close(f1[slow], f0[slow] * 384 / 896)  # slow dims are interpolated by old/new
    assert (f1[f0 == 0] == 0).all() and len(rotary.scales) == 4


# ----------------------------------------------------------------------------- model


def test_parameter_count_and_the_layer_layout():
    args = tg.parse_args([])
    with torch.device("meta"):
        model = tg.GPT(args)
    assert model.gate.sizes == [26, 41] and model.mudd.sizes == [14, 5]
    assert [b.attn.paired for b in model.blocks if b.attn] == [True, False, True, False, False, True, False, False,
                                                              True, False]
    attn = [b.attn for b in model.blocks]
    assert [i for i, a in enumerate(attn) if a and a.xsa] == [1, 3, 4, 7]
    assert [i for i, a in enumerate(attn) if a and a.key_offset] == [3, 10]
    assert [i for i, a in enumerate(attn) if a and a.dc_window] == [10] and attn[6] is None


@pytest.mark.parametrize("use_flex", [False, True])
@torch.no_grad()  # FlexAttention has no backward on a CPU
def test_changing_a_token_never_changes_earlier_outputs(use_flex):
    args = tiny_args(use_flex_attention=use_flex)
    model = set_plan(randomized(tg.GPT(args)).eval(), args, 5)
    seq = documents(128, [0, 40, 41, 90])
    base = model.logits(seq)
    for t in (3, 40, 77, 127):
        changed = seq.clone()
        changed[t] = (seq[t] + 7) % 50000
        out = model.logits(changed)
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=0)
        assert not torch.allclose(out[t:], base[t:])


@pytest.mark.parametrize("variant", ["paired", "dc", "windows", "all"])
@torch.no_grad()
def test_no_attention_across_documents(variant):
    """Smear, the bigram hash and the key offset look one token back across a document start by design (as the
    record); with those off, nothing of document 0 may reach document 1, whatever the attention variant."""
    variants = dict(paired=dict(paired_head_layers="0,4", xsa_layers="1,2"), dc=dict(dc_layers="5"),
                    windows=dict(token_windows=False), all={})
    args = tiny_args(use_smear=False, bigram_vocab_size=0, key_offset_layers="", use_mudd=False, **variants[variant])
    model = set_plan(randomized(tg.GPT(args)).eval(), args, 8)
    seq = documents(128, [0, 50])
    changed = seq.clone()
    changed[1:50] = (seq[1:50] + 11) % 50000  # all of document 0 but its BOS
    base, out = model.logits(seq), model.logits(changed)
    torch.testing.assert_close(out[50:], base[50:], rtol=0, atol=0)
    assert not torch.allclose(out[:50], base[:50])


@pytest.mark.parametrize("variant", ["paired", "key_offset", "dc", "token_windows", "block_windows"])
@torch.no_grad()  # FlexAttention has no backward on a CPU
def test_flex_attention_equals_the_dense_twin_for_every_variant(variant):
    only = dict(paired=dict(paired_head_layers="0,4", xsa_layers="1,2"), key_offset=dict(key_offset_layers="2,5"),
                dc=dict(dc_layers="5"), token_windows={}, block_windows=dict(token_windows=False))[variant]
    off = dict(paired_head_layers="", key_offset_layers="", dc_layers="")
    seq = documents(128, [0, 33, 34, 90])
    losses = []
    for use_flex in (False, True):
        args = tiny_args(use_flex_attention=use_flex, **{**off, **only})
        losses.append(set_plan(randomized(tg.GPT(args), seed=5).eval(), args, 9).logits(seq))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)


def test_paired_heads_attend_over_two_slots_per_token():
    """A paired layer's query slot 2t (heads 0..H/2-1 of token t) sees slots up to 2t; slot 2t+1 also sees 2t."""
    docs = tg.document_ids(documents(32, [0, 20]))
    pair_docs = docs[:, None].expand(-1, 2).reshape(-1)
    mask = tg.dense_mask(pair_docs, torch.tensor(2), 8, token_windows=True)
    assert mask[2 * 5, 2 * 5] and not mask[2 * 5, 2 * 5 + 1] and mask[2 * 5 + 1, 2 * 5]
    assert mask[38, 38 - 16] and not mask[38, 38 - 17]  # the window counts slots: 2 blocks of 8 = 16 slots back
    assert not mask[2 * 20, 2 * 19 + 1]  # token 20 starts a document


def test_dc_correction_is_local_and_stays_in_its_document():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=gen) for _ in range(3))
    docs = tg.document_ids(documents(64, [0, 30]))
    w1, w2 = torch.rand(1, 64, 2, generator=gen), torch.rand(1, 64, 2, generator=gen)
    out = tg.dc_correction(q, k, v, docs, w1, w2, torch.tensor(0.3), window=5, block=16)
    # by hand: P_g over keys t-4..t of the same document, A = sum_g w1_g P_g, out_h = w2_h A v_h
    expected = torch.zeros_like(out)
    for t in range(64):
        keys = [s for s in range(max(0, t - 4), t + 1) if docs[s] == docs[t]]
        A = sum(w1[0, t, g] * torch.softmax(0.3 * (k[0, keys, g] @ q[0, t, g]), 0) for g in range(2))
        for h in range(2):
            expected[0, t, h] = w2[0, t, h] * (A @ v[0, keys, h])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mudd_is_a_no_op_at_init_except_the_backout():
    args = tiny_args(value_embed_pattern="-01-0-")  # no value embedding in the MUDD layer (its gate starts at 2)
    seq = documents(64, [0, 30])
    torch.manual_seed(7)
    with_mudd = set_plan(tg.GPT(args).eval(), args, 2)
    torch.manual_seed(7)
    plain_args = dataclasses.replace(args, use_mudd=False)
    without = set_plan(tg.GPT(plain_args).eval(), plain_args, 2)
    shared = {k: v for k, v in with_mudd.state_dict().items() if not k.startswith(("mudd.", "gate."))}
    without.load_state_dict(shared, strict=False)
    with torch.no_grad():  # give the residual stream content (c_proj and the bigram table start at zero)
        for m in (with_mudd, without):
            for b in m.blocks:
                b.mlp.c_proj.copy_(torch.full_like(b.mlp.c_proj, 0.01))
    streams = {}  # the outputs of layer 3 (attn_input_layer) and of the last layer, without MUDD
    hooks = [without.blocks[i].register_forward_hook(lambda mod, a, out, i=i: streams.__setitem__(i, out))
             for i in (3, 5)]
    without.hidden(seq)
    for h in hooks:
        h.remove()
    expected = tg.norm(streams[5] - 0.5 * streams[3]).flatten(end_dim=1)  # the backout: minus half of layer 3's
    torch.testing.assert_close(with_mudd.hidden(seq), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        with_mudd.mudd.b2[1, 1] = 0  # the backout off: the rest of MUDD changes nothing at init
    torch.testing.assert_close(with_mudd.hidden(seq), without.hidden(seq), rtol=1e-5, atol=1e-5)


def test_the_model_trains_in_bf16_with_fp8_mlp_and_head_on_a_cpu():
    args = tiny_args(dtype="bfloat16", use_fp8=True, use_fp8_mlp=True, fp8_x_scale=100 / 448)
    model = set_plan(tg.GPT(args), args, 0)
    assert model.blocks[0].mlp.c_fc.dtype == torch.bfloat16 and model.scalars.dtype == torch.float32
    model.set_window_index(2)
    seq = documents(65, [0, 30])
    loss = model(seq[:-1], seq[1:])
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[1].mlp.c_proj.grad.abs().sum() > 0
    assert model.mlp_act_scales[:, 2].ne(1).all() and model.mlp_act_scales[:, [0, 1, 3]].eq(1).all()


def test_in_bf16_every_matmul_of_the_step_takes_bf16_operands():
    """The residual stream stays bf16 from the embedding on (as in the record): an fp32 tensor with a dimension in
    a product with the stream (e.g. a 1-element slice of the fp32 scalars) would promote it, and every later matmul
    would run in fp32, without tensor cores (found by benchmark.py --estimate: 148 of 150 matmuls, ~5x the step).
    The DC correction's small einsum is fp32 on purpose, so it is off here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "bmm", "addmm", "baddbmm", "_scaled_mm"):
                self.seen.append(tuple(str(a.dtype) for a in args[:2] if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    args = tiny_args(dtype="bfloat16", dc_layers="", use_smear=True, bigram_vocab_size=1024)
    model = set_plan(randomized(tg.GPT(args)), args, 0)
    seq = documents(65, [0, 30])
    with MatmulDtypes() as probe:
        model(seq[:-1], seq[1:]).backward()
    assert len(probe.seen) > 50 and set(probe.seen) == {("torch.bfloat16", "torch.bfloat16")}, set(probe.seen)


# ----------------------------------------------------------------------------- runs


def run_argv(shard_dir: Path, log_dir: Path, **overrides) -> list[str]:
    settings = dataclasses.asdict(tiny_args())
    settings.update(train_files=str(shard_dir / "t_train_*.bin"), val_files=str(shard_dir / "t_val_*.bin"),
                    val_every=4, log_dir=str(log_dir), **overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards26")
    rng = np.random.default_rng(0)
    for name, n in (("t_val_000000.bin", 2048), ("t_train_000001.bin", 60_000)):
        docs = [np.concatenate([[BOS], (rng.integers(0, 64) + np.arange(rng.integers(10, 150))) % 64 + 1000])
                for _ in range(n // 40)]
        tg.write_shard(d / name, np.concatenate(docs)[:n])
    return d


def test_a_tiny_2026_run_learns_and_the_warmup_is_undone(shard_dir, tmp_path):
    cold = tg.main(run_argv(shard_dir, tmp_path, warmup_steps=0))
    warm = tg.main(run_argv(shard_dir, tmp_path, warmup_steps=1))  # also steps around the stage changes
    assert warm["val_losses"] == cold["val_losses"]
    assert list(cold["val_losses"]) == [0, 4, 8, 11]
    assert cold["val_losses"][11] < cold["val_losses"][0] - 1.0


@pytest.mark.slow
def test_two_processes_train_the_2026_recipe_as_one(shard_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_gpt import run_dumping_metrics

    argv = run_argv(shard_dir, tmp_path, warmup_steps=0)
    one = run_dumping_metrics([sys.executable], argv, tmp_path / "one.json")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run_dumping_metrics(torchrun, argv, tmp_path / "two.json")
    assert one["val_losses"].keys() == two["val_losses"].keys() == {"0", "4", "8", "11"}
    for step, loss in one["val_losses"].items():
        assert abs(two["val_losses"][step] - loss) / loss < 1e-5, (step, loss, two["val_losses"][step])


@pytest.mark.parametrize("shape", [(2, 512, 128), (2, 128, 128), (2, 64, 192)])
def test_muon_update_in_bf16_agrees_with_fp32(shape):
    """Polar Express + NorMuon in bf16 (as a GPU runs them) against the same formulas in fp32, on a gradient with a
    low-rank part: within 2% (Frobenius) and 3% of the largest entry. Each iteration's b*A + c*A@A and a*X + B@X is
    one multiply-add accumulated in fp32 and rounded once, as the 2026-08 record's kernels compute them (rounding A@A
    first, then scaling and adding in bf16, as we did before, misses: 2.8-3.2% and 3.4-5.7% here)."""
    gen = torch.Generator().manual_seed(0)
    n, rows, cols = shape
    g = torch.randn(*shape, generator=gen) + 3 * torch.randn(n, rows, 8, generator=gen) @ torch.randn(
        n, 8, cols, generator=gen) / 8**0.5
    V = {}
    for dtype in (torch.float32, torch.bfloat16):
        X = tg.orthogonalize(g, "polar_express", 5, dtype)
        moment = torch.zeros((n, rows, 1) if rows >= cols else (n, 1, cols))
        V[dtype] = tg.normuon_normalize(X, moment, 0.9)
    assert V[torch.bfloat16].dtype == torch.bfloat16  # applied rounded, as on a GPU
    diff, ref = V[torch.bfloat16].float() - V[torch.float32], V[torch.float32]
    assert diff.norm() / ref.norm() < 0.02 and diff.abs().max() / ref.abs().max() < 0.03
