"""Collectives have one home (mmscale/dist.py) and one device.

NCCL, the default group on GPUs, rejects CPU tensors; gloo, the default group of the suite,
takes any. So the suite runs the code with the communication device patched to `meta` (a device
no CPU tensor is on) and torch.distributed replaced by a recorder: every tensor handed to a
default-group collective must be on that device, from every helper and from every caller
(the train state, the skip counter, evaluation gathers, the feature cache, the losses). Host-side
agreements use their own gloo group and must stay on the CPU.
"""
import importlib
import pkgutil
import sys
import time
import types

import pytest
import torch

import mmscale
import mmscale.dist as md
from distributed import leave_without_cleanup, run_ranks

META = torch.device("meta")


class Recorder(types.SimpleNamespace):
    """Stands in for torch.distributed inside mmscale.dist: a 2-rank world whose collectives record
    (name, device, group) and leave the tensors as they are."""

    class ReduceOp:
        SUM, MAX = "sum", "max"

    def __init__(self):
        super().__init__(calls=[])

    def _record(self, name, t=None, group=None):
        self.calls.append((name, None if t is None else t.device, group))

    def all_gather(self, parts, x, group=None):
        self._record("all_gather", x, group)
        assert all(p.device == x.device for p in parts)

    def all_reduce(self, t, op=None, group=None, async_op=False):
        self._record("all_reduce", t, group)
        return types.SimpleNamespace(wait=lambda: None) if async_op else None

    def broadcast_object_list(self, box, src=0, group=None):
        self._record("broadcast_object_list", None, group)  # torch places the pickled bytes itself

    def barrier(self, group=None):
        self._record("barrier", None, group)

    # point to point (SigLIP's ring exchange): P2POp(op, tensor, peer) batched
    isend, irecv = "isend", "irecv"

    def P2POp(self, op, tensor, peer, group=None):
        return types.SimpleNamespace(op=op, tensor=tensor, peer=peer, group=group)

    def batch_isend_irecv(self, ops):
        for o in ops:
            self._record(o.op, o.tensor, o.group)
        return [types.SimpleNamespace(wait=lambda: None) for _ in ops]

    def new_group(self, backend=None, **kwargs):
        return f"host-{backend}"

    def get_backend(self, group=None):
        return "gloo"

    group = types.SimpleNamespace(WORLD="world")  # the default group, as dist.group.WORLD names it

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_rank(self):  # dist.rank_and_world reads these: (0, 2) wherever it was imported from
        return 0

    def get_world_size(self):
        return 2


class ToMeta(torch.autograd.Function):
    """x.to(meta) whose backward hands back zeros where x was (a meta gradient cannot be read)."""

    @staticmethod
    def forward(ctx, x):
        ctx.device = x.device
        return x.to(META).contiguous()

    @staticmethod
    def backward(ctx, g):
        return torch.zeros(g.shape, dtype=g.dtype, device=ctx.device)


class FromMeta(torch.autograd.Function):
    """A collective's meta result back on `device` as ones of its shape; the gradient goes to meta."""

    @staticmethod
    def forward(ctx, t, device):
        return torch.ones(t.shape, dtype=t.dtype, device=device)

    @staticmethod
    def backward(ctx, g):
        return g.to(META), None


@pytest.fixture
def comm(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(md, "dist", rec)
    monkeypatch.setattr(md, "comm_device", lambda: META)
    monkeypatch.setattr(md, "_to_comm", lambda t: t if t.device == META else ToMeta.apply(t))
    monkeypatch.setattr(md, "_back", lambda t, device: t if torch.device(device) == META else FromMeta.apply(t, device))
    world = lambda: (0, 2)  # noqa: E731
    # every module first, so that none imports rank_and_world while it is patched and keeps the fake
    for info in pkgutil.walk_packages(mmscale.__path__, "mmscale."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):  # every module that imported rank_and_world by name
        if name.startswith("mmscale") and getattr(module, "rank_and_world", None) is md.__dict__["rank_and_world"]:
            monkeypatch.setattr(module, "rank_and_world", world)
    monkeypatch.setattr(md, "rank_and_world", world)
    return rec


def default_group_devices(rec):
    return [(name, device) for name, device, group in rec.calls if group is None and device is not None]


def assert_on_comm_device(rec, expect_calls=True):
    calls = default_group_devices(rec)
    assert calls or not expect_calls, "no collective was recorded: the test did not reach one"
    wrong = [c for c in calls if c[1] != META]
    assert not wrong, f"tensors off the communication device reached the default group: {wrong}"


def test_every_helper_hands_the_default_group_tensors_on_the_comm_device(comm):
    md.all_reduce_sum(1.5)
    md.all_reduce_sum(3)
    md.all_reduce_sum(torch.tensor(2.0))  # a device scalar (the loss): moved, not float()-ed first
    md.any_rank(True)
    assert md.gather_rows(torch.ones(3, 2), 5).device.type == "cpu"  # back where the caller's rows were
    x = torch.randn(4, 3, requires_grad=True)
    y = md.all_gather_with_grad(x)
    assert y.shape == (8, 3) and y.device.type == "cpu"
    y.sum().backward()  # the backward all-reduce too
    assert x.grad is not None and x.grad.device.type == "cpu"
    md.broadcast_object({"a": 1})
    md.barrier()
    names = {name for name, _ in default_group_devices(comm)}
    assert names == {"all_reduce", "all_gather"}
    assert sum(name == "all_reduce" for name, _ in default_group_devices(comm)) == 5  # 4 sums/flags + backward
    assert_on_comm_device(comm)


def test_host_agreements_use_their_own_cpu_group(comm):
    flag = md.HostFlag()
    assert flag.exchange(0) == 0 and flag.exchange(15) == 0 and flag.exchange(0) == 15
    host = [(n, d, g) for n, d, g in comm.calls if g is not None]
    assert host and all(g == "host-gloo" and d.type == "cpu" for _, d, g in host)
    assert not default_group_devices(comm)


def test_train_state_and_skip_counter(comm):
    from mmscale.engine.state import SkipCounter, TrainState
    state = TrainState("cpu")
    state.add_loss(torch.tensor(1.25))
    state.pop_mean_loss()
    state.state_dict()
    TrainState.global_mean(torch.tensor(0.5))
    skipped = SkipCounter()
    skipped.add(3)
    skipped.total()
    skipped.state_dict()
    assert len(default_group_devices(comm)) == 5
    assert_on_comm_device(comm)


def test_losses_gather_on_the_comm_device(comm):
    from mmscale.losses import contrastive_loss
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    keys = torch.tensor([0, 1, 0, 2])  # loss.positives: the keys are gathered too
    for variant in ("global", "local", "ring"):
        for tile in (0, 3):
            contrastive_loss(image, text, torch.tensor(10.0), variant, tile).backward()
            contrastive_loss(image, text, torch.tensor(10.0), variant, tile, keys).backward()
    assert_on_comm_device(comm)
    from mmscale.losses import siglip_loss
    comm.calls.clear()
    for exchange in ("bidir", "gather", "ring"):
        siglip_loss(image, text, torch.tensor(10.0), torch.tensor(-10.0), exchange, tile=3).backward()
        siglip_loss(image, text, torch.tensor(10.0), torch.tensor(-10.0), exchange, 3, keys).backward()
    assert {name for name, _ in default_group_devices(comm)} == {"isend", "irecv", "all_gather", "all_reduce"}
    assert_on_comm_device(comm)
    from mmscale.dist import gather_outputs
    out = gather_outputs({"emb": torch.randn(4, 8, requires_grad=True), "label": torch.arange(4),
                          "logit_scale": torch.tensor(1.0)}, shared=("logit_scale",))
    assert out["emb"].shape == (8, 8) and out["label"].dtype == torch.int64 and out["logit_scale"].dim() == 0
    assert_on_comm_device(comm)


class StubModel(torch.nn.Module):
    """Encodes on the CPU, as a model would on its device; the gathers must move the rows."""

    def tokenize(self, texts):
        return {"input_ids": torch.ones(len(texts), 4, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 4, dtype=torch.long)}

    def encode_text(self, ids, mask):
        return torch.ones(ids.shape[0], 6)

    def forward(self, batch):
        return {"logits": torch.ones(batch["x"].shape[0], 3)}

    def tower(self, name):
        return types.SimpleNamespace(tokenize_fn=lambda: self.tokenize)

    def tower_features(self, name, inputs):
        return torch.ones(inputs["input_ids"].shape[0], 4, 6), inputs["attention_mask"].bool()


def test_evaluation_gathers_and_the_feature_cache(comm):
    from mmscale.data.features import _tower_outputs
    from mmscale.data.images import Sample
    from mmscale.eval.evaluators import embed_texts, predict
    assert embed_texts(StubModel(), ["a", "b", "c"], "cpu").shape == (3, 6)
    dataset = [{"x": torch.zeros(2), "label": torch.tensor(1)} for _ in range(3)]

    def collate(items):
        return {"x": torch.stack([i["x"] for i in items]), "label": torch.stack([i["label"] for i in items])}
    assert predict(StubModel(), dataset, collate, "cpu", torch.float32)["logits"].shape == (3, 3)
    samples = [Sample("none.jpg", f"caption {i}") for i in range(3)]
    _tower_outputs(StubModel(), "text", "text", samples, 32, "cpu", batch_size=2)
    assert len(default_group_devices(comm)) == 5  # 1 + 2 (logits, labels) + 2 (features, mask)
    assert_on_comm_device(comm)


def test_the_comm_device_follows_the_backend(monkeypatch):
    """gloo (and no group at all) -> the CPU; any other backend (NCCL) -> the accelerator."""
    assert md.comm_device() == torch.device("cpu")
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_backend=lambda: "nccl")
    monkeypatch.setattr(md, "dist", fake)
    monkeypatch.setattr(md, "current_device", lambda: META)
    assert md.comm_device() == META
    fake.get_backend = lambda: "gloo"
    assert md.comm_device() == torch.device("cpu")


def test_group_timeouts_reach_groups_created_without_one(monkeypatch):
    """DeepSpeed's data-parallel groups come from new_group() without a timeout: they must get
    train.dist_timeout_s (NCCL: a margin above it, so the heartbeat names a lost rank first)."""
    import datetime
    from torch.distributed import distributed_c10d as c10d
    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    md.set_group_timeouts(120)
    assert c10d._get_default_timeout("gloo") == datetime.timedelta(seconds=120)
    if c10d.default_pg_nccl_timeout is not None:
        assert c10d._get_default_timeout("nccl") == datetime.timedelta(seconds=120 + md.NCCL_TIMEOUT_MARGIN_S)


def test_optimizer_state_follows_its_parameters():
    """A universal checkpoint loads Adam's state on the CPU; the fused CUDA Adam reads `step` on the
    parameter's device. meta stands in for the GPU."""
    from mmscale.engine.backend import place_optimizer_state
    p = torch.nn.Parameter(torch.zeros(3, device=META))
    opt = torch.optim.Adam([p])
    opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3, device=META)}
    assert place_optimizer_state(opt) == 2
    assert all(v.device == META for v in opt.state[p].values())
    assert place_optimizer_state(opt) == 0


def test_image_normalisation_constants_are_made_once_per_device():
    from mmscale.data.images import CLIP_MEAN, mean_std, normalize_images
    a, b = mean_std("cpu"), mean_std(torch.device("cpu"))
    assert a[0] is b[0] and a[1] is b[1]
    assert torch.allclose(a[0].flatten(), torch.tensor(CLIP_MEAN))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expect = (images.float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / a[1]
    assert torch.allclose(normalize_images(images), expect)


# ---------------------------------------------------------------- host work on rank 0 alone

def _rank0_outlasts_the_timeout(rank, world, timeout_s):
    """Rank 0 works 2.5x the default group's timeout while the others wait: through on_rank0 every
    rank gets the result; waiting in a default-group collective instead (broadcast_object, what the
    linear probe and the universal conversion did) ends in gloo's timeout on the waiting rank."""
    work = 2.5 * timeout_s

    def slow(x):
        time.sleep(work)
        return {"value": x, "host": rank}

    tic = time.monotonic()
    assert md.on_rank0(slow, 7) == {"value": 7, "host": 0}
    assert time.monotonic() - tic >= work - 0.5  # everyone waited for rank 0
    def fail():
        raise ValueError("bad probe")

    # rank 0 raises its own error, every other rank hears of it (instead of waiting a week)
    with pytest.raises(ValueError if rank == 0 else RuntimeError, match="bad probe"):
        md.on_rank0(fail)
    # the control: the same wait in the default group times out, so the case above is a real one.
    # Rank 0 stays busy and never joins; only the waiting rank enters the collective, so no data
    # ever reaches a pair that has timed out (rank 0 sending into it later aborted rank 1 inside
    # gloo once, on a loaded machine: "terminate called without an active exception").
    if rank == 0:
        time.sleep(work)
    else:
        with pytest.raises(RuntimeError):
            md.broadcast_object("late")
    leave_without_cleanup()


def test_rank0_work_longer_than_the_collective_timeout_completes():
    run_ranks(_rank0_outlasts_the_timeout, 2, 2.0, timeout_s=2.0)


def test_host_work_waits_on_its_own_gloo_group(comm):
    assert md.on_rank0(lambda: 3) == 3
    assert [(name, group) for name, _, group in comm.calls] == [("broadcast_object_list", "host-gloo")]
