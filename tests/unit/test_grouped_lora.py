"""Grouped LoRA for decode steps: each row gets exactly its own adapter's update, whatever
else shares the step, including adapters that target only some of a fused projection's
modules (PEFT adapters on q and v only) and adapters of different ranks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from tinkerd.engine.model import LoraStacks, LoraWeights
from tinkerd.engine.sampler import row_adapter_batch

IN = 16
SIZES = (12, 4, 4)  # q, k, v outputs fused into one projection
PATHS = ("q", "k", "v")


def adapter(seed: int, rank: int, paths: tuple[str, ...]) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    outs = dict(zip(PATHS, SIZES, strict=True))
    return LoraWeights(
        a={p: torch.randn(rank, IN, generator=gen) for p in paths},
        b={p: torch.randn(outs[p], rank, generator=gen) for p in paths},
        scale=0.5 + seed,
    )


@pytest.fixture(params=["torch", "C kernel"])
def kernels(request):
    """Both decode paths: torch's gather / bmm / gather back, and the float32 CPU kernel."""
    return None if request.param == "torch" else request.getfixturevalue("c_kernels")


def reference(
    y: torch.Tensor, x: torch.Tensor, adapters: list[LoraWeights | None], sizes: tuple[int, ...] = SIZES
) -> torch.Tensor:
    """Row by row: y plus that row's own update of each module it targets."""
    out = y.clone()
    for row, a in enumerate(adapters):
        o0 = 0
        for path, size in zip(PATHS, sizes, strict=True):
            if a is not None and path in a.a:
                out[row, o0 : o0 + size] += (x[row] @ a.a[path].t() @ a.b[path].t()) * a.scale
            o0 += size
    return out


@pytest.mark.parametrize(
    "layout",
    [
        "one adapter, every module",
        "one adapter, q and v only",
        "three adapters, mixed modules and ranks, and base rows",
        "two adapters, q and v only",
    ],
)
def test_each_row_gets_its_own_adapters_update(layout, kernels):
    full, qv, other = adapter(1, 4, PATHS), adapter(2, 2, ("q", "v")), adapter(3, 8, ("k",))
    qv2 = adapter(4, 6, ("q", "v"))
    rows = {
        "one adapter, every module": [full] * 5,
        "one adapter, q and v only": [qv] * 5,
        "three adapters, mixed modules and ranks, and base rows": [full, qv, None, full, other, qv, full],
        "two adapters, q and v only": [qv, qv2, qv2, qv],
    }[layout]
    x = torch.randn(len(rows), IN)
    y = torch.randn(len(rows), sum(SIZES))
    batch = row_adapter_batch(rows, torch.device("cpu"), OrderedDict(), kernels)
    assert (batch.grouped.kernels is not None) == (kernels is not None)
    got = batch.apply_fused(y.clone(), x, PATHS, SIZES)
    torch.testing.assert_close(got, reference(y, x, rows), rtol=1e-5, atol=1e-5)
    # One module on its own (o_proj / down_proj style) through the same stacks.
    want_q = reference(y, x, rows)[:, : SIZES[0]]
    torch.testing.assert_close(batch.apply(y[:, : SIZES[0]].clone(), x, "q"), want_q, rtol=1e-5, atol=1e-5)


def test_stacks_are_built_once_per_module():
    stacks = LoraStacks((adapter(1, 4, PATHS), None))
    like = torch.zeros(1)
    assert stacks.get_fused(PATHS, SIZES, like) is stacks.get_fused(PATHS, SIZES, like)


def test_prefill_segments_add_in_place_what_training_adds_out_of_place():
    """A prefill/scoring pass (no autograd) adds each segment's update into the projection's
    output in place; a training pass builds it out of place. Same values, per module of a
    fused output and for a module on its own."""
    from tinkerd.engine.model import AdapterBatch, AdapterSegment

    full, qv = adapter(1, 4, PATHS), adapter(2, 2, ("q", "v"))
    batch = AdapterBatch([AdapterSegment(0, 2, full), AdapterSegment(2, 3, None), AdapterSegment(3, 5, qv)])
    x = torch.randn(5, 3, IN)  # 5 sequences of 3 tokens
    y = torch.randn(5, 3, sum(SIZES))
    with torch.enable_grad():
        want_fused = batch.apply_fused(y.clone().requires_grad_(), x, PATHS, SIZES).detach()
        want_q = batch.apply(y[..., : SIZES[0]].clone().requires_grad_(), x, "q").detach()
    with torch.no_grad():
        fused_out = y.clone()
        assert batch.apply_fused(fused_out, x, PATHS, SIZES) is fused_out  # written in place
        q_out = batch.apply(y[..., : SIZES[0]].clone(), x, "q")
    torch.testing.assert_close(fused_out, want_fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_out, want_q, rtol=1e-5, atol=1e-5)
    rows = [full, full, None, qv, qv]
    for t in range(3):  # and both equal the row-by-row reference
        torch.testing.assert_close(fused_out[:, t], reference(y[:, t], x[:, t], rows), rtol=1e-5, atol=1e-5)


def test_the_same_adapters_in_another_row_order_reuse_their_stacks(kernels):
    """Stacks are keyed by the set of adapters, so rows that arrive in another order (or a row
    that leaves and joins again) reuse them instead of copying every adapter's weights again."""
    first, second = adapter(1, 4, PATHS), adapter(2, 2, ("q", "v"))
    cache: OrderedDict = OrderedDict()
    a = row_adapter_batch([first, second, first], torch.device("cpu"), cache, kernels)
    b = row_adapter_batch([second, first, None, second], torch.device("cpu"), cache, kernels)
    c = row_adapter_batch([second, first], torch.device("cpu"), cache, kernels)
    assert a.grouped.stacks is c.grouped.stacks  # same set, other order
    assert b.grouped.stacks is not a.grouped.stacks  # None (base rows) makes another set
    x, y = torch.randn(2, IN), torch.randn(2, sum(SIZES))
    torch.testing.assert_close(c.apply_fused(y.clone(), x, PATHS, SIZES), reference(y, x, [second, first]), rtol=1e-5, atol=1e-5)


def test_kernel_many_rows_wide_outputs_and_large_ranks(kernels):
    """Shapes that exercise every blocking of the C kernel: more than 4 rows of one adapter,
    outputs over several 64-column tiles with a ragged last tile, and ranks that sum past 64
    (and are not multiples of 16). The torch path must agree too."""
    sizes, in_dim = (130, 64, 70), 40
    outs = dict(zip(PATHS, sizes, strict=True))

    def wide(seed: int, rank: int, paths: tuple[str, ...]) -> LoraWeights:
        gen = torch.Generator().manual_seed(seed)
        return LoraWeights(
            a={p: torch.randn(rank, in_dim, generator=gen) for p in paths},
            b={p: torch.randn(outs[p], rank, generator=gen) for p in paths},
            scale=0.25 * seed,
        )

    big, small = wide(1, 40, PATHS), wide(2, 3, ("k", "v"))
    rows = [big, small, big, big, None, big, big, small, big, big, small]
    x, y = torch.randn(len(rows), in_dim), torch.randn(len(rows), sum(sizes))
    want = reference(y, x, rows, sizes)
    batch = row_adapter_batch(rows, torch.device("cpu"), OrderedDict(), kernels)
    got = batch.apply_fused(y.clone(), x, PATHS, sizes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_kernel_refuses_inputs_that_do_not_match_its_weights(c_kernels):
    kernels = c_kernels
    stacks = LoraStacks((adapter(1, 4, PATHS), adapter(2, 2, ("q", "v"))))
    blocks = stacks.get_blocks(PATHS, SIZES)
    order, offsets = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError):  # input width is not the adapters'
        kernels.lora_grouped(torch.randn(2, IN + 1), order, offsets, blocks, torch.zeros(2, sum(SIZES)))
    with pytest.raises(ValueError):  # output narrower than the fused projection
        kernels.lora_grouped(torch.randn(2, IN), order, offsets, blocks, torch.zeros(2, sum(SIZES) - 1))
    with pytest.raises(ValueError):  # a row index out of range
        kernels.lora_grouped(torch.randn(2, IN), torch.tensor([0, 5], dtype=torch.int32), offsets, blocks,
                             torch.zeros(2, sum(SIZES)))


def test_training_segments_get_the_gradients_of_separate_passes():
    """A training pass adds each segment's update in place through one autograd function. Its
    output and every gradient (input, base output, each adapter's A and B) equal the plain
    autograd of per-row products; base rows and an adapter without the module get none."""
    from tinkerd.engine.model import AdapterBatch, AdapterSegment

    def trainable(seed: int, rank: int, paths: tuple[str, ...]) -> LoraWeights:
        w = adapter(seed, rank, paths)
        for t in (*w.a.values(), *w.b.values()):
            t.requires_grad_(True)
        return w

    full, other, kv = trainable(1, 4, PATHS), trainable(2, 3, PATHS), trainable(3, 2, ("k", "v"))
    rows = [full, full, None, other, other, other, kv]
    segments = [AdapterSegment(0, 2, full), AdapterSegment(2, 3, None), AdapterSegment(3, 6, other),
                AdapterSegment(6, 7, kv)]
    x0 = torch.randn(len(rows), 3, IN)  # 3 tokens per row
    w0 = torch.randn(SIZES[0], IN)
    params = [t for a in (full, other, kv) for t in (*a.a.values(), *a.b.values())]

    def run(fused: bool) -> tuple[torch.Tensor, list]:
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        with torch.enable_grad():
            y = x @ w.t()  # a base projection with a gradient of its own
            if fused:
                out = AdapterBatch(segments).apply(y, x, "q")
            else:
                out = y + torch.stack([(x[i] @ a.a["q"].t() @ a.b["q"].t()) * a.scale if a is not None and "q" in a.a
                                       else torch.zeros_like(y[i]) for i, a in enumerate(rows)])
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [x.grad, w.grad] + [p.grad.clone() if p.grad is not None else None for p in params]
        for p in params:
            p.grad = None
        return out.detach(), grads

    got, got_grads = run(True)
    want, want_grads = run(False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None or not w.any():
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert kv.a["k"].grad is None  # the module it lacks ("q") gave it nothing


def test_kernel_weights_are_laid_out_once_per_adapter_whatever_set_it_decodes_in(c_kernels):
    """When the set of adapters in a decode step changes (a tenant's last row finishes, another
    joins), the C kernel's new set points at each adapter's blocks built before: nothing is
    copied again, and the results stay right."""
    kernels = c_kernels
    first, second, third = adapter(1, 4, PATHS), adapter(2, 2, ("q", "v")), adapter(3, 8, PATHS)
    cache: OrderedDict = OrderedDict()
    x, y = torch.randn(3, IN), torch.randn(3, sum(SIZES))
    before = row_adapter_batch([first, second, third], torch.device("cpu"), cache, kernels)
    before.apply_fused(y.clone(), x, PATHS, SIZES)
    built = {id(a): a.kernel_blocks["+".join(PATHS)] for a in (first, second, third)}
    rows = [third, None, first]
    after = row_adapter_batch(rows, torch.device("cpu"), cache, kernels)
    assert after.grouped.stacks is not before.grouped.stacks  # another set
    torch.testing.assert_close(after.apply_fused(y.clone(), x, PATHS, SIZES), reference(y, x, rows), rtol=1e-5, atol=1e-5)
    for a in (first, third):
        assert a.kernel_blocks["+".join(PATHS)] is built[id(a)]
