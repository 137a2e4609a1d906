"""The character language models: the DEQ-Transformer LM against dense mathematics (float64),
causality, per-sequence solver statistics and non-finite isolation, the explicit baseline,
sampling, and the character corpus loader."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import phantomdeq as pdq
from phantomdeq import diagnostics as D
from phantomdeq.data import DataError, DataFileNotFoundError
from phantomdeq.data.text import CharVocab, TextBatches, load_text, sequential_batches
from phantomdeq.models import deq_lm, transformer
from phantomdeq.models.deq_lm import DEQTransformerLM
from phantomdeq.nn import VariationalDropout1d

ROOT = Path(__file__).resolve().parents[1]
VOCAB, WIDTH, HEADS, CONTEXT, LENGTH = 7, 8, 2, 6, 5

ESTIMATORS = {
    "upg": lambda: pdq.UPG(k=5, lam=0.5),
    "npg": lambda: pdq.NPG(k=5, lam=0.5),
    "ift": lambda: pdq.IFT(solver=pdq.FixedPoint(max_iter=300, tol=1e-13)),
    "onestep": lambda: pdq.OneStep(),
}


def tiny(grad=None, solver=None, *, std=0.15, seed=0, **kw) -> DEQTransformerLM:
    """A float64 DEQ-LM (width 8, 2 heads) whose cell weights are drawn large enough for the
    estimators to differ (spectral radius of ∂f/∂z between 0.2 and 0.9: contractive)."""
    torch.manual_seed(seed)
    model = DEQTransformerLM(
        VOCAB,
        width=WIDTH,
        heads=HEADS,
        context=CONTEXT,
        solver=solver or pdq.FixedPoint(max_iter=300, tol=1e-13),
        grad=grad or pdq.UPG(k=5, lam=0.5),
        **kw,
    ).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in model.f.block.linears():
            w = lin.weight
            w.copy_(std * torch.randn(w.shape, generator=gen, dtype=w.dtype))
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen, dtype=w.dtype))
        lns = [model.f.block.ln1, model.f.block.ln2]
        if model.f.ln_out is not None:
            lns.append(model.f.ln_out)
        for ln in lns:
            ln.weight.add_(0.1 * torch.randn(WIDTH, generator=gen, dtype=torch.float64))
            ln.bias.copy_(0.1 * torch.randn(WIDTH, generator=gen, dtype=torch.float64))
        if model.f.ln_out is not None:  # the output's scale sets postnorm's contraction
            model.f.ln_out.weight.mul_(0.5)
    return model


def tokens(batch: int = 2, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def solve_and_head(model: DEQTransformerLM, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The model's forward from the injection ``x`` on (logits, info)."""
    z, info = model.deq(model.initial_state(x), x)
    return model.head(z), info


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("form", deq_lm.FORMS)
@pytest.mark.parametrize("est", ESTIMATORS)
def test_causality_exact_through_the_solve_and_every_estimator(est, form) -> None:
    """Fixed-budget fixed-point solve (tol=0, 12 steps: the residual still falls at every step,
    so the solver's lowest-residual iterate is the last one for every sequence), train mode
    with 1-d variational dropout and the estimator attached. For every t and a change of token t+1 (and of every later token):
    (1) the logits at positions <= t are bitwise equal;
    (2) the gradient of S_t = <w, logits[:, :t+1]> w.r.t. the injection at positions > t is
        exactly zero;
    (3) its gradients w.r.t. every parameter and the injection at positions <= t are the same
        for both token sequences (to rounding: 1e-12)."""
    model = tiny(
        ESTIMATORS[est](), pdq.FixedPoint(max_iter=12, tol=0.0), var_dropout=0.3, form=form
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    idx = tokens()
    w = torch.randn(
        2, LENGTH, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    for t in range(LENGTH - 1):
        other = idx.clone()
        other[:, t + 1 :] = (idx[:, t + 1 :] + 1 + torch.arange(LENGTH - t - 1)) % VOCAB
        runs = []
        for seq in (idx, other):
            x = model.inject(seq).detach().requires_grad_()
            model.f.reset(x, generator=torch.Generator().manual_seed(9))
            logits, _ = solve_and_head(model, x)
            s = (w[:, : t + 1] * logits[:, : t + 1]).sum()
            gx, *gp = torch.autograd.grad(s, [x, *params], allow_unused=True)
            runs.append((logits.detach(), gx, gp))
        (la, gxa, gpa), (lb, gxb, gpb) = runs
        assert torch.equal(la[:, : t + 1], lb[:, : t + 1])
        assert not torch.equal(la[:, t + 1 :], lb[:, t + 1 :])  # the change is seen later
        for gx in (gxa, gxb):
            assert torch.count_nonzero(gx[:, t + 1 :]) == 0
            assert torch.isfinite(gx).all() and gx[:, : t + 1].abs().sum() > 0
        assert torch.allclose(gxa, gxb, rtol=1e-12, atol=1e-15)
        for a, b in zip(gpa, gpb):
            if a is None or b is None:
                assert a is None and b is None
            else:
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_anderson_couples_positions_only_at_its_tolerance() -> None:
    """Anderson mixes whole sequences with per-sequence coefficients: the logits at positions
    <= t move when token t+1 changes, but by no more than the solve's tolerance allows."""
    model = tiny(solver=pdq.Anderson(max_iter=100, tol=1e-11)).eval()
    idx = tokens()
    other = idx.clone()
    other[:, 3] = (idx[:, 3] + 2) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(other)
    assert a.info.result == "converged" and b.info.result == "converged"
    assert float((a.logits[:, :3] - b.logits[:, :3]).abs().max()) < 1e-8


# --------------------------------------------------------------------------- dense gradients


def _grads(model: DEQTransformerLM, idx: torch.Tensor):
    """Estimator gradient of <t, z> w.r.t. the cell's parameters and the injection."""
    x = model.inject(idx).detach().requires_grad_()
    z, info = model.deq(model.initial_state(x), x)
    assert info.result == "converged"
    target = torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(7))
    wrt = [*model.f.parameters(), x]
    return list(torch.autograd.grad((z * target).sum(), wrt)), info, target, wrt, x


@pytest.mark.parametrize("form", deq_lm.FORMS)
def test_ift_equals_the_dense_exact_implicit_gradient(form) -> None:
    model = tiny(pdq.IFT(solver=pdq.FixedPoint(max_iter=400, tol=1e-14)), form=form).train()
    grads, info, target, wrt, x = _grads(model, tokens())
    exact = D.exact_gradient(model.f, info.z, (x,), wrt, target)
    assert D.relative_error(grads[:-1], exact[:-1]) <= 1e-10
    assert D.relative_error(grads[-1], exact[-1]) <= 1e-10
    # contractive, and far enough from trivial that the estimators below differ
    J_h, _ = D.dense_jacobians(model.f, info.z, (x,), [])
    radius = float(torch.linalg.eigvals(J_h).abs().max())
    assert 0.2 < radius < 0.9


@pytest.mark.parametrize("form", deq_lm.FORMS)
@pytest.mark.parametrize("name", ["upg", "npg"])
def test_phantom_gradients_match_their_matrices_and_approach_the_exact_gradient(name, form) -> None:
    idx = tokens(batch=1)  # one sequence: 20 dense Jacobians of a 40-entry state stay fast
    model = tiny(form=form).train()
    _, info, target, wrt, x = _grads(model, idx)
    exact = D.exact_gradient(model.f, info.z, (x,), wrt, target)
    g = target.reshape(-1)
    ks, lam = (1, 3, 8, 20), 0.8
    if name == "upg":
        mats = D.unrolled_matrices(model.f, info.z, (x,), wrt, ks, lam)
    else:
        J_h, J_w = D.dense_jacobians(model.f, info.z, (x,), wrt)
        mats = D.neumann_matrices(D.paper_layout(J_h), D.paper_layout(J_w), ks, lam)
    errors = []
    for k in ks:
        with model.deq.using(grad=pdq.grad.from_name(name, k=k, lam=lam)):
            got, *_ = _grads(model, idx)
        assert D.relative_error(got, mats[k] @ g) <= 1e-9  # eq. (17) / (18) exactly
        errors.append(D.relative_error(got, exact))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-4


def test_upg_1_1_is_onestep() -> None:
    idx = tokens()
    model = tiny(pdq.OneStep()).train()
    one, info, target, wrt, x = _grads(model, idx)
    with model.deq.using(grad=pdq.UPG(k=1, lam=1.0)):
        upg, *_ = _grads(model, idx)
    _, J_w = D.dense_jacobians(model.f, info.z, (x,), wrt)
    assert D.relative_error(one, J_w.T @ target.reshape(-1)) <= 1e-10
    assert D.relative_error(upg, one) <= 1e-12


# --------------------------------------------------------------------------- per sequence


def test_solver_statistics_are_per_sequence() -> None:
    model = tiny(solver=pdq.Anderson(max_iter=100, tol=1e-9)).eval()
    idx = tokens(batch=3)
    with torch.no_grad():
        out = model(idx)
        x = model.inject(idx)
        fz = model.f(out.state, x)
    info = out.info
    for field in (info.nstep, info.converged, info.rel_residual, info.nonfinite):
        assert field.shape == (3,)
    assert info.converged.all()
    rel = (fz - out.state).flatten(1).norm(dim=1) / out.state.flatten(1).norm(dim=1)
    assert torch.allclose(rel, info.rel_residual.to(rel.dtype), rtol=1e-6, atol=1e-15)
    for b in range(3):  # each sequence alone solves to the same equilibrium
        with torch.no_grad():
            alone = model(idx[b : b + 1])
        assert torch.allclose(alone.state[0], out.state[b], rtol=0, atol=1e-8)


@pytest.mark.parametrize("est", ESTIMATORS)
def test_a_nonfinite_sequence_is_isolated(est) -> None:
    """Sequence 2's injection holds a NaN. With on_nonfinite="warn" the other sequences'
    states and gradients (w.r.t. the cell and their injections) are those of the batch
    without sequence 2; sequence 2 gets a zero injection gradient; nothing is NaN."""
    model = tiny(ESTIMATORS[est](), pdq.Anderson(max_iter=200, tol=1e-11), on_nonfinite="warn")
    model.train()
    idx = tokens(batch=4)
    keep = [0, 1, 3]
    params = list(model.f.parameters())
    x = model.inject(idx).detach().clone()
    x[2, 3, 1] = math.nan
    x.requires_grad_()
    with pytest.warns(
        RuntimeWarning, match=r"non-finite values in 1 of 4 samples \(indices \[2\]\)"
    ):
        z, info = model.deq(model.initial_state(x), x)
    assert info.nonfinite.tolist() == [False, False, True, False]
    assert info.converged.tolist() == [True, True, False, True]
    target = torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((z[keep] * target[keep]).sum(), [x, *params])

    x_ref = model.inject(idx[keep]).detach().requires_grad_()
    z_ref, info_ref = model.deq(model.initial_state(x_ref), x_ref)
    assert info_ref.result == "converged"
    want = torch.autograd.grad((z_ref * target[keep]).sum(), [x_ref, *params])
    assert torch.isfinite(z).all() and all(torch.isfinite(g).all() for g in got)
    assert torch.allclose(z[keep], z_ref, rtol=0, atol=1e-12)
    assert torch.allclose(got[0][keep], want[0], rtol=1e-9, atol=1e-13)
    assert torch.count_nonzero(got[0][2]) == 0
    for a, b in zip(got[1:], want[1:]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_raise_names_the_nonfinite_sequence() -> None:
    model = tiny(solver=pdq.Anderson(max_iter=50, tol=1e-8))
    with torch.no_grad():
        model.embed.tok.weight[0] = math.nan
    idx = tokens(batch=3) % (VOCAB - 1) + 1  # no token 0 ...
    idx[1, 2] = 0  # ... except in sequence 1
    with pytest.raises(pdq.DEQError, match=r"1 of 3 samples \(indices \[1\]\)"):
        model(idx)


# --------------------------------------------------------------------------- the model's options


def test_variational_dropout_mask_is_one_per_sequence_and_shared_by_every_evaluation() -> None:
    model = tiny(var_dropout=0.5).train()
    idx = tokens(batch=3)
    x = model.inject(idx)
    model.f.reset(x, generator=torch.Generator().manual_seed(0))
    drop = model.f.block.drop1
    assert isinstance(drop, VariationalDropout1d) and drop.mask is not None
    assert drop.mask.shape == (3, 1, WIDTH)
    z = torch.randn_like(x)
    with torch.no_grad():
        assert torch.equal(model.f(z, x), model.f(z, x))
    masks = []
    hook = drop.register_forward_pre_hook(lambda m, a: masks.append(m.mask))
    model(idx, generator=torch.Generator().manual_seed(1))
    hook.remove()
    assert len(masks) > 5 and all(m is masks[0] for m in masks)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx).logits, model(idx).logits)


def test_variational_dropout_1d_contract() -> None:
    """The layout the DEQ-LM uses (``channels_last=True``: ``[N, L, C]``), one mask per
    sequence and feature; the class's general contract is in test_nn_dropout_nd.py."""
    d = VariationalDropout1d(0.5, channels_last=True).train()
    x = torch.ones(2, 3, 4)
    with pytest.raises(RuntimeError):
        d(x)
    mask = d.reset(x, generator=torch.Generator().manual_seed(0))
    assert mask is not None and mask.shape == (2, 1, 4)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    y = d(x)
    assert torch.equal(y[:, 0], y[:, 2])  # one mask for every position
    with pytest.raises(ValueError, match="p"):
        VariationalDropout1d(1.0)
    d.eval()
    assert torch.equal(d(x), x)


def test_output_shapes_modes_and_options() -> None:
    model = tiny(
        correction=pdq.Correction(states=3, gamma=0.8), solver=pdq.FixedPoint(max_iter=20, tol=0.0)
    )
    idx = tokens(batch=2, length=4)
    out = model(idx, jac_reg=True)
    assert out.logits.shape == (2, 4, VOCAB) and out.state.shape == (2, 4, WIDTH)
    assert out.jac_loss is not None and out.jac_loss.requires_grad
    # its gradient is second order through attention (float32: the fused CPU kernels lack it)
    m32 = deq_lm.build(VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT)
    reg = m32(idx, jac_reg=True).jac_loss
    assert reg is not None
    reg.backward()
    grads = [p.grad for p in m32.f.parameters() if p.grad is not None]
    assert m32.f.block.attn.qkv.weight.grad is not None
    assert all(torch.isfinite(g).all() for g in grads)
    assert out.state_logits is not None and len(out.state_logits) == 3
    assert out.state_weights == pytest.approx([0.64, 0.8, 1.0])
    unrolled = model(idx, mode="unrolled", unrolled_steps=3)
    assert unrolled.info is None and unrolled.logits.shape == (2, 4, VOCAB)
    warm = model(idx, z0=out.state.detach())
    assert warm.info.niter <= out.info.niter
    for norm in ("weight", "spectral"):
        m = deq_lm.build(
            VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT, norm=norm, lipschitz=0.05
        )
        assert all(nn.utils.parametrize.is_parametrized(lin) for lin in m.f.block.linears())
        m(idx).logits.sum().backward()
        if norm == "spectral":
            for lin in m.f.block.linears():
                # bounded to the power iteration's estimate of the largest singular value
                assert torch.linalg.matrix_norm(lin.weight.detach(), 2) <= 0.05 * 1.05
    tied = deq_lm.build(VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT, tie_weights=True)
    assert tied.head.out.weight is tied.embed.tok.weight


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"width": 10, "heads": 4}, "width must be divisible by heads"),
        ({"norm": "batch"}, "norm must be one of"),
        ({"form": "post"}, "form must be one of"),
        ({"var_dropout": 1.0}, "var_dropout must be in"),
        ({"context": 0}, "context must be an integer >= 1"),
    ],
)
def test_bad_options_name_the_field(kwargs, pattern) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        deq_lm.build(VOCAB, **{"width": WIDTH, "heads": HEADS, **kwargs})


def test_an_input_longer_than_the_context_names_it() -> None:
    model = deq_lm.build(VOCAB, width=WIDTH, heads=HEADS, context=4)
    with pytest.raises(ValueError, match="the model's context is 4"):
        model(tokens(length=5))
    with pytest.raises(ValueError, match="context is 4"):
        transformer.build(VOCAB, width=WIDTH, heads=HEADS, context=4)(tokens(length=5))


# --------------------------------------------------------------------------- explicit baseline


def test_explicit_baseline_shapes_causality_and_parameters() -> None:
    torch.manual_seed(0)
    model = transformer.build(VOCAB, layers=3, width=WIDTH, heads=HEADS, context=CONTEXT).double()
    deq = deq_lm.build(VOCAB, width=WIDTH, heads=HEADS, context=CONTEXT)
    idx = tokens()
    out = model(idx)
    assert out.logits.shape == (2, LENGTH, VOCAB) and out.info is None
    block = sum(p.numel() for p in deq.f.block.parameters())
    assert sum(p.numel() for p in model.blocks.parameters()) == 3 * block
    # the DEQ's cell is one block plus its output LayerNorm (postnorm): 2 * width more
    cell = sum(p.numel() for p in deq.f.parameters())
    assert cell == block + 2 * WIDTH
    outside = sum(p.numel() for p in deq.parameters()) - cell
    assert sum(p.numel() for p in model.parameters()) == 3 * block + outside
    for t in range(LENGTH - 1):
        other = idx.clone()
        other[:, t + 1] = (idx[:, t + 1] + 1) % VOCAB
        xs = [model.embed(s).detach().requires_grad_() for s in (idx, other)]
        logits = []
        for x in xs:
            z = x
            for blk in model.blocks:
                z = blk(z, z)
            logits.append(model.head(z))
        assert torch.equal(logits[0][:, : t + 1], logits[1][:, : t + 1])
        (g,) = torch.autograd.grad(logits[0][:, : t + 1].sum(), xs[0])
        assert torch.count_nonzero(g[:, t + 1 :]) == 0


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("factory", [deq_lm.build, transformer.build])
def test_generate_is_reproducible_and_respects_top_k(factory) -> None:
    torch.manual_seed(0)
    model = factory(VOCAB, width=WIDTH, heads=HEADS, context=4).double()
    with torch.no_grad():  # spread the logits so that top_k matters
        model.head.out.weight.mul_(200.0)
    prompt = tokens(batch=2, length=2)
    runs = [
        model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert runs[0].shape == (2, 10) and torch.equal(runs[0][:, :2], prompt)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert model.training  # the mode is restored
    greedy = model.generate(prompt, 6, top_k=1)
    k3 = model.generate(
        prompt, 6, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(3)
    )
    model.eval()
    with torch.no_grad():
        for seq, k in ((greedy, 1), (k3, 3)):
            for i in range(2, seq.shape[1]):
                logits = model(seq[:, max(0, i - 4) : i]).logits[:, -1]
                rank = (logits > logits.gather(1, seq[:, i : i + 1])).sum(1)
                assert (rank < k).all()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)


# --------------------------------------------------------------------------- the corpus


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_load_text_builds_the_vocabulary_and_splits_90_10(tmp_path: Path) -> None:
    text = "hello world, é ünïcode!\n" * 10
    path = _write(tmp_path, "c.txt", text.encode("utf-8"))
    corpus = load_text(path)
    assert corpus.vocab.chars == tuple(sorted(set(text)))
    assert corpus.vocab_size == len(set(text)) and corpus.num_chars == len(text)
    n_train = int(len(text) * 0.9)
    assert corpus.train.dtype == torch.long and corpus.train.numel() == n_train
    assert corpus.vocab.decode(corpus.train) + corpus.vocab.decode(corpus.val) == text
    saved = json.loads(json.dumps(corpus.vocab.to_dict()))
    again = CharVocab.from_dict(saved)
    assert again == corpus.vocab and again is not corpus.vocab
    assert load_text(path, vocab=saved).vocab == corpus.vocab  # resume with the saved vocab


def test_load_text_errors_name_the_file_or_field(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataFileNotFoundError, match="nope.txt"):
        load_text(missing)
    with pytest.raises(DataError, match=r"empty\.txt.*empty"):
        load_text(_write(tmp_path, "empty.txt", b""))
    with pytest.raises(DataError, match=r"latin\.txt.*not UTF-8"):
        load_text(_write(tmp_path, "latin.txt", "caf\xe9".encode("latin-1")))
    with pytest.raises(DataError, match="is a directory"):
        load_text(tmp_path)
    a = load_text(_write(tmp_path, "a.txt", b"abcabcabc"))
    with pytest.raises(DataError, match=r"b\.txt.*vocabulary mismatch.*new: 'd'"):
        load_text(_write(tmp_path, "b.txt", b"abcdabcd"), vocab=a.vocab.to_dict())
    with pytest.raises(DataError, match=r"vocab\.kind"):
        CharVocab.from_dict({"kind": "bpe", "chars": ["a"]})
    with pytest.raises(DataError, match="train_fraction"):
        load_text(tmp_path / "a.txt", train_fraction=1.0)
    with pytest.raises(DataError, match=r"context=8 is too long for the val split of 1 tokens"):
        TextBatches(a.val, batch_size=2, context=8, split="val")


def test_batches_are_shifted_windows_reproducible_and_resumable(tmp_path: Path) -> None:
    data = torch.arange(100) % 17
    sampler = TextBatches(data, batch_size=4, context=8, generator=torch.Generator().manual_seed(0))
    x, y = next(sampler)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    first = [next(sampler) for _ in range(2)]
    state = sampler.state_dict()
    after = [next(sampler) for _ in range(3)]
    resumed = TextBatches(
        data, batch_size=4, context=8, generator=torch.Generator().manual_seed(99)
    )
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(after, (next(resumed) for _ in range(3))))
    fresh = TextBatches(data, batch_size=4, context=8, seed=0)
    replay = [next(fresh) for _ in range(3)]
    assert torch.equal(replay[1][0], first[0][0]) and torch.equal(replay[0][0], x)
    with pytest.raises(DataError, match="saved context=8"):
        TextBatches(data, batch_size=4, context=9).load_state_dict(state)
    windows = list(sequential_batches(data, batch_size=5, context=8))
    xs = torch.cat([w[0] for w in windows])
    ys = torch.cat([w[1] for w in windows])
    assert xs.shape == (12, 8) and torch.equal(xs.flatten(), data[:96])
    assert torch.equal(ys.flatten(), data[1:97])


def _shakespeare() -> Path | None:
    for base in (ROOT.parent, ROOT.parent.parent):  # main checkout, or a worktree beside it
        p = base / "shared" / "data" / "tinyshakespeare" / "input.txt"
        if p.is_file():
            return p
    return None


@pytest.mark.skipif(_shakespeare() is None, reason="../shared/data/tinyshakespeare not present")
def test_tiny_shakespeare_is_the_standard_corpus() -> None:
    path = _shakespeare()
    assert path is not None
    sums = dict(
        reversed(line.split()) for line in (path.parent / "MD5SUMS").read_text().splitlines()
    )
    assert hashlib.md5(path.read_bytes()).hexdigest() == sums["input.txt"]
    corpus = load_text(path)
    assert corpus.num_chars == 1_115_394 and corpus.vocab_size == 65
    assert corpus.train.numel() == 1_003_854 and corpus.val.numel() == 111_540
