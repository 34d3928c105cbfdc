"""The engine's CUDA path: mixed precision, GPU-resident data, agreement with the CPU, exact resume.

Every test here is marked ``cuda`` and skipped, with its reason, on a machine without a GPU;
``pytest -m cuda`` runs just these where one is present.
"""
import math

import pytest
import torch
from engine_runs import interrupted_then_resumed

from dcanets.engine import TrainConfig, train
from dcanets.engine import data as data_mod

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is not run")]


@pytest.fixture(autouse=True)
def _fp32_cuda(tmp_path, monkeypatch):
    """Full fp32 matmuls/convolutions (no TF32) so CPU and GPU runs are comparable."""
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = old


def tiny(**kw):
    base = dict(model="cifar_resnet20", data="synthetic:256", limit=256, batch_size=32, epochs=2, lr=0.05)
    return TrainConfig(**{**base, **kw})


def test_amp_training_runs_on_the_gpu_and_learns():
    final = train(tiny(model="cifar_negnet20", epochs=4, amp=True, data="digits", limit=512))
    assert final["device"].startswith("cuda") and final["amp"] is True
    hist = final["history"]
    assert all(math.isfinite(m["train_loss"]) for m in hist)
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert final["val_acc"] > 0.3  # 10 classes: chance is 0.1


def test_fp32_gpu_steps_agree_with_the_cpu():
    cpu = train(tiny(device="cpu", amp=False, epochs=1))
    gpu = train(tiny(device="cuda", amp=False, epochs=1))
    assert gpu["device"].startswith("cuda") and gpu["amp"] is False
    assert gpu["train_loss"] == pytest.approx(cpu["train_loss"], rel=1e-3)
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=1e-2)


def test_resume_on_the_gpu_continues_the_uninterrupted_run(tmp_path):
    cfg = tiny(device="cuda", amp=True, epochs=3, augment=True, output=str(tmp_path / "run"))
    whole = train(tiny(device="cuda", amp=True, epochs=3, augment=True))

    resumed = interrupted_then_resumed(cfg)
    assert resumed["epoch"] == 3
    # the same batches, augmentations, loss scale and lr steps: equal up to GPU reduction order
    for got, want in zip(resumed["history"], whole["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-3)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)


@pytest.mark.parametrize("opt", ["dcal2", "dcacounter", "dcaprox"])
def test_decompositions_step_on_the_gpu(opt):
    """Under ``amp``: closure-free decompositions with autocast, dcaprox (closure) in full precision."""
    final = train(tiny(model="cifar_plainnet20", opt=opt, lr=0.02, epochs=1, amp=True))
    assert final["device"].startswith("cuda") and math.isfinite(final["train_loss"])


def _plain_loop_on_cuda(name: str, mode: str):
    """Four steps of ``name`` on cifar_plainnet20 in a plain loop (``mode``: "scaled" = fp32 with a
    GradScaler, "fp16" = autocast float16 + GradScaler) or through the closure path ("closure")."""
    import timm
    import timm.optim
    import torch.nn.functional as F

    from dcanets.optim import prepare

    torch.manual_seed(0)
    model = timm.create_model("cifar_plainnet20").cuda()
    batches = [(torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))
               for _ in range(4)]
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.05)
    assert not prepare(opt, model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 14, enabled=mode != "closure")
    for x, y in batches:
        if mode == "closure":
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            continue
        opt.zero_grad()
        with torch.autocast("cuda", torch.float16, enabled=mode == "fp16"):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return model


@pytest.mark.parametrize("name", ["dcacounter", "dcaquasihalf", "dcaquasineghalf"])
def test_closure_free_decompositions_under_a_grad_scaler(name):
    """The hooked eq. 17 vector c is unscaled with the gradients: a GradScaler'd fp32 loop takes the
    closure path's steps, and an fp16 autocast loop stays finite."""
    ref = _plain_loop_on_cuda(name, "closure")
    scaled = _plain_loop_on_cuda(name, "scaled")
    err = max(float((p - q).detach().abs().max()) for p, q in zip(scaled.parameters(), ref.parameters()))
    assert err < 1e-4, err
    assert all(torch.isfinite(p).all() for p in _plain_loop_on_cuda(name, "fp16").parameters())


def test_small_decoded_sets_live_on_the_gpu():
    images = data_mod.synthetic(64, num_classes=3, size=8, channels=3, seed=0)
    loader = data_mod.BatchLoader(images, 16, [0.5] * 3, [0.25] * 3, device="cuda", seed=0)
    assert loader.images.device.type == "cuda"
    x, y = next(iter(loader))
    assert x.device.type == "cuda" and x.dtype == torch.float32 and y.device.type == "cuda"


def test_recipe_under_fp16_amp_clips_the_unscaled_gradient():
    """Mixup, EMA, clipping and accumulation under fp16 autocast with a GradScaler: the optimizer steps
    with the unscaled gradient clipped to clip_grad (steps the scaler skips for inf never reach it)."""
    from dcanets.engine import loop as engine

    run = engine._Run(tiny(amp=True, amp_dtype="float16", mixup=0.2, cutmix=1.0, model_ema=True, clip_grad=0.5,
                           grad_accum_steps=2), progress=False)
    assert run.scaler.is_enabled()
    norms, step = [], run.optimizer.step

    def recording(*args, **kwargs):
        grads = [p.grad.double() for p in run.model.parameters() if p.grad is not None]
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
        return step(*args, **kwargs)

    run.optimizer.step = recording
    stats = run.train_epoch()
    assert math.isfinite(stats["train_loss"]) and run.num_updates == 4  # 256 images, batches of 32, pairs
    assert norms and all(n <= 0.5 * (1 + 1e-3) for n in norms), norms
    assert any(not torch.equal(e, m) for e, m in zip(run.recipe.ema.module.state_dict().values(),
                                                      run.model.state_dict().values()))


@pytest.mark.parametrize("opt", ["sgd", "dcacounter"])
def test_one_gpu_nccl_group_trains_through_ddp_as_the_single_process_run(tmp_path, opt):
    """A one-rank NCCL process group (what each rank of ``--nproc N`` on N GPUs has): the model runs
    wrapped in DistributedDataParallel, the decomposition's collectives (eq. 17's c) go through NCCL
    on the GPU, rank 0 writes; the numbers are those of the run without a group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dcanets.engine import loop

    cfg = tiny(opt=opt, opt_kwargs={"beta_policy": "clamp"} if opt != "sgd" else {}, epochs=1, amp=False,
               device="cuda", model="cifar_plainnet20")
    alone = train(cfg)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        run = loop._Run(cfg, progress=False)
        assert isinstance(run.parallel, DistributedDataParallel) and dist.get_backend() == "nccl"
        grouped = train(cfg.model_copy(update={"output": str(tmp_path / "run")}))
    finally:
        dist.destroy_process_group()
    assert grouped["world_size"] == 1 and grouped["device"].startswith("cuda")
    assert (tmp_path / "run" / "last.pt").is_file()
    assert grouped["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-3)
