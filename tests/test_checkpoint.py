"""envs.pretrain: train + cache round trip, clear errors for corrupt / mismatched / missing checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil

import pytest
import torch

from envs import pretrain, training
from envs.data import Split
from envs.models import build_model
from envs.paths import CACHE_ENV
from envs.pretrain import (
    CheckpointError,
    Recipe,
    checkpoint_path,
    get_pretrained,
    load_checkpoint,
    save_checkpoint,
    train,
)

WIDTH = 0.25
RECIPE = Recipe(epochs=1, max_train=256, batch_size=64, bf16=False)


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(fmnist, tmp_path_factory):
    """One get_pretrained call that trains resnet20 (width 0.25, 256 images, 1 epoch) into its own cache."""
    cache = tmp_path_factory.mktemp("ckpt-cache")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        real_train = pretrain.train
        mp.setattr(pretrain, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
        model, meta = get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist, progress=False)
        path = checkpoint_path("resnet20", "fashion-mnist", WIDTH, 0, RECIPE)
    return {"cache": cache, "path": path, "model": model, "meta": meta, "train_calls": len(calls),
            "mtime": path.stat().st_mtime_ns}


def _install(trained, tmp_cache):
    """Copy the trained checkpoint (+ sidecar) into this test's cache; return its path there."""
    rel = trained["path"].relative_to(trained["cache"])
    dst = tmp_cache / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(trained["path"], dst)
    shutil.copy2(trained["path"].with_suffix(".json"), dst.with_suffix(".json"))
    assert dst == checkpoint_path("resnet20", "fashion-mnist", WIDTH, 0, RECIPE)
    return dst


def _no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("train() must not be called")

    monkeypatch.setattr(pretrain, "train", fail)


def test_first_call_trains_and_writes_checkpoint(trained, fmnist):
    path = trained["path"]
    assert trained["train_calls"] == 1
    assert path.parent == trained["cache"] / "checkpoints"
    assert path.suffix == ".pt" and path.exists()
    assert not path.with_name(path.name + ".partial").exists()  # removed once the checkpoint is saved
    assert not path.with_suffix(".tmp").exists()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    for key in ("test_accuracy", "recipe", "versions", "data_fingerprint"):
        assert key in sidecar
    assert sidecar == trained["meta"]
    assert 0.0 <= sidecar["test_accuracy"] <= 1.0
    assert sidecar["test_loss"] == pytest.approx(sidecar["test_loss"]) and sidecar["test_loss"] > 0  # finite
    assert sidecar["recipe"] == dataclasses.asdict(RECIPE)
    assert sidecar["versions"]["torch"] == torch.__version__
    assert sidecar["data_fingerprint"] == fmnist.fingerprint
    assert sidecar["train_images"] == 256
    assert sidecar["model"] == "resnet20" and sidecar["width"] == WIDTH and sidecar["in_channels"] == 1
    assert not trained["model"].training
    # The saved file is a plain weights-only state dict equal to the returned model's.
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert _state_equal(state, trained["model"].state_dict())


def test_second_call_loads_without_training(trained, fmnist, tmp_cache, monkeypatch):
    path = _install(trained, tmp_cache)
    mtime = path.stat().st_mtime_ns
    _no_training(monkeypatch)
    model, meta = get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist, train_if_missing=False)
    assert _state_equal(model.state_dict(), trained["model"].state_dict())
    assert meta == trained["meta"]
    assert path.stat().st_mtime_ns == mtime
    assert not model.training
    # Same predictions as the freshly trained model.
    x = fmnist.test.x[:64]
    with torch.no_grad():
        assert torch.equal(model(x), trained["model"](x))
    # The original cache was not rewritten either.
    assert trained["path"].stat().st_mtime_ns == trained["mtime"]


def test_get_pretrained_loads_default_dataset(trained, fmnist, tmp_cache, monkeypatch):
    # Without data=, get_pretrained loads Fashion-MNIST itself (same fingerprint, so the cache is accepted).
    _install(trained, tmp_cache)
    _no_training(monkeypatch)
    monkeypatch.setattr(pretrain, "load_dataset", lambda *a, **k: fmnist)
    model, _ = get_pretrained("resnet20", width=WIDTH, recipe=RECIPE)
    assert _state_equal(model.state_dict(), trained["model"].state_dict())


def test_explicit_checkpoint_file(trained, fmnist):
    model, meta = get_pretrained("resnet20", width=WIDTH, data=fmnist, checkpoint=trained["path"])
    assert _state_equal(model.state_dict(), trained["model"].state_dict())
    assert meta["test_accuracy"] == trained["meta"]["test_accuracy"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint(trained, fmnist, tmp_cache, monkeypatch, damage):
    path = _install(trained, tmp_cache)
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a torch file \x00\xff" * 40, "truncated": raw[: len(raw) // 2],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt") as exc:
        load_checkpoint(path, "resnet20", num_classes=10, in_channels=1, width=WIDTH)
    assert str(path) in str(exc.value)
    # get_pretrained reports it too, instead of silently retraining over it.
    _no_training(monkeypatch)
    with pytest.raises(CheckpointError, match="corrupt"):
        get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist)


def test_pickled_object_is_rejected(tmp_path):
    # weights_only=True: an arbitrary pickled object is refused, not executed.
    path = tmp_path / "evil.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, "resnet20", in_channels=1, width=WIDTH)
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_checkpoint(path, "resnet20", in_channels=1, width=WIDTH)


def test_bad_sidecar(trained, tmp_cache):
    path = _install(trained, tmp_cache)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(path, "resnet20", num_classes=10, in_channels=1, width=WIDTH)


@pytest.mark.parametrize(
    "name, width, in_channels, num_classes",
    [("resnet20", 0.5, 1, 10), ("resnet56", WIDTH, 1, 10), ("resnet20", WIDTH, 3, 10), ("resnet20", WIDTH, 1, 5)],
)
def test_mismatched_architecture(trained, name, width, in_channels, num_classes):
    with pytest.raises(CheckpointError, match="does not match") as exc:
        load_checkpoint(trained["path"], name, num_classes=num_classes, in_channels=in_channels, width=width)
    msg = str(exc.value)
    assert name in msg
    assert "resnet20 (width 0.25" in msg  # what it was saved for, from the sidecar


def test_matching_architecture_loads(trained):
    model, meta = load_checkpoint(trained["path"], "resnet20", num_classes=10, in_channels=1, width=WIDTH)
    assert _state_equal(model.state_dict(), trained["model"].state_dict())
    assert meta["model"] == "resnet20"


def test_different_data_fingerprint(trained, fmnist, tmp_cache, monkeypatch):
    path = _install(trained, tmp_cache)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["data_fingerprint"] = "0123456789abcdef"
    path.with_suffix(".json").write_text(json.dumps(meta))
    _no_training(monkeypatch)
    with pytest.raises(CheckpointError, match="different data"):
        get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist)


def test_missing_checkpoint_names_command(fmnist, tmp_cache, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(CheckpointError) as exc:
        get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist, train_if_missing=False)
    msg = str(exc.value)
    assert "python -m envs.pretrain" in msg
    assert "--model resnet20" in msg and "--width 0.25" in msg
    assert str(tmp_cache) in msg
    assert not (tmp_cache / "checkpoints").exists() or not any((tmp_cache / "checkpoints").iterdir())


def test_missing_checkpoint_command_recreates_same_path(fmnist, monkeypatch, capsys):
    """The command in the error, run as given, writes exactly the checkpoint that was missing."""
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05)  # fields the CLI can express
    with pytest.raises(CheckpointError) as exc:
        get_pretrained("resnet20", width=WIDTH, split_seed=3, recipe=recipe, data=fmnist, train_if_missing=False)
    cmd = str(exc.value).split("`")[1]
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "envs.pretrain"]
    seen = {}

    def fake_get_pretrained(*args, **kwargs):  # record what main() asks for instead of training
        seen["args"] = args
        return None, {"test_accuracy": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(pretrain, "get_pretrained", fake_get_pretrained)
    assert pretrain.main(argv[3:]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["checkpoint"] == str(checkpoint_path("resnet20", "fashion-mnist", WIDTH, 3, recipe))


# ---- resume --------------------------------------------------------------------------------------------------

RESUME_RECIPE = Recipe(epochs=2, max_train=128, batch_size=64, bf16=False)  # 2 steps per epoch


class Interrupted(Exception):
    pass


@pytest.fixture
def small_data(fmnist):
    """The default splits with small test / reward sets, so train()'s final evaluation is quick."""
    return dataclasses.replace(
        fmnist,
        test=Split(fmnist.test.x[:200], fmnist.test.y[:200]),
        reward=Split(fmnist.reward.x[:200], fmnist.reward.y[:200], fmnist.reward.indices[:200]),
    )


def _count_steps(monkeypatch, fail_at: int | None = None) -> list:
    """Count training steps (one augment call per batch); raise Interrupted at step ``fail_at`` (1-based)."""
    calls = []
    real = training.augment

    def wrapped(*a, **k):
        calls.append(1)
        if fail_at is not None and len(calls) >= fail_at:
            raise Interrupted
        return real(*a, **k)

    monkeypatch.setattr(training, "augment", wrapped)
    return calls


def test_resume_from_partial(small_data, tmp_path, monkeypatch, capsys):
    path = tmp_path / "ckpt" / "resnet20-resume.pt"
    partial = path.with_name(path.name + ".partial")

    # Reference: the same recipe without interruption (no path: no partial file).
    ref_model, _ = train("resnet20", small_data, WIDTH, RESUME_RECIPE, path=None, progress=False, device="cpu")

    # Interrupted during epoch 2 (step 3 of 4): the partial file holds epoch 1.
    with monkeypatch.context() as mp:
        steps = _count_steps(mp, fail_at=3)
        with pytest.raises(Interrupted):
            train("resnet20", small_data, WIDTH, RESUME_RECIPE, path=path, progress=False, device="cpu")
        assert len(steps) == 3
    assert partial.exists()
    state = torch.load(partial, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "generator", "elapsed"} <= set(state)

    # Running again picks the partial up and only trains the remaining epoch.
    capsys.readouterr()
    with monkeypatch.context() as mp:
        steps = _count_steps(mp)
        model, meta = train("resnet20", small_data, WIDTH, RESUME_RECIPE, path=path, progress=False, device="cpu")
        assert len(steps) == 2
    assert "resuming" in capsys.readouterr().err
    assert torch.load(partial, map_location="cpu", weights_only=True)["epoch"] == 2
    # Resuming restores model, optimizer, scheduler and data order: same weights as the uninterrupted run.
    ref = ref_model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=f"{k} differs after resume")
    assert meta["train_images"] == 128
    # Saving the final checkpoint removes the partial file.
    save_checkpoint(model, meta, path)
    assert path.exists() and path.with_suffix(".json").exists() and not partial.exists()


def test_unreadable_partial_restarts(small_data, tmp_path, monkeypatch, capsys):
    path = tmp_path / "resnet20-broken.pt"
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(b"garbage")
    steps = _count_steps(monkeypatch)
    train("resnet20", small_data, WIDTH, RESUME_RECIPE, path=path, progress=False)
    assert len(steps) == 4  # both epochs from scratch
    assert "ignoring unreadable partial" in capsys.readouterr().err
    assert torch.load(partial, map_location="cpu", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("max_train, epochs", [(64, 1), (128, 2), (192, 1), (320, 1), (384, 1)])
def test_tiny_runs(small_data, max_train, epochs):
    # 1..6 optimizer steps: the one-cycle schedule must not break on any of them (4 steps used to divide by 0).
    recipe = Recipe(epochs=epochs, max_train=max_train, batch_size=64, bf16=False)
    model, meta = train("resnet20", small_data, WIDTH, recipe, path=None, progress=False)
    assert meta["train_images"] == max_train
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- shipped checkpoint
def test_shipped_checkpoint_installs_verified_and_in_float32(trained, fmnist, tmp_path, tmp_cache, monkeypatch):
    shipped_dir = tmp_path / "shipped"
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", shipped_dir)
    out = pretrain.ship_checkpoint(trained["path"], fmnist, device="cpu")
    meta = json.loads(out.with_suffix(".json").read_text())
    half = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    assert meta["sha256"] == pretrain.sha256_of(out)
    assert meta["trained_accuracy"]["test"] == trained["meta"]["test_accuracy"]
    # float16 rounding moves the accuracy a little, and the sidecar reports the shipped weights' accuracy
    assert abs(meta["test_accuracy"] - trained["meta"]["test_accuracy"]) <= 0.02
    _no_training(monkeypatch)
    model, got = get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist, train_if_missing=False)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert got["source"].startswith("shipped") and got["sha256"] == meta["sha256"]
    for k, v in model.state_dict().items():
        ref = trained["model"].state_dict()[k]
        assert torch.allclose(v, ref.half().to(ref.dtype), atol=0, rtol=0) or not v.is_floating_point()


def test_damaged_shipped_checkpoint_is_refused(trained, fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", tmp_path / "shipped")
    out = pretrain.ship_checkpoint(trained["path"], fmnist, device="cpu")
    blob = bytearray(out.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    out.write_bytes(bytes(blob))
    _no_training(monkeypatch)
    with pytest.raises(CheckpointError, match="sha256"):
        get_pretrained("resnet20", width=WIDTH, recipe=RECIPE, data=fmnist, train_if_missing=False)


@pytest.mark.parametrize("path", sorted(pretrain.SHIPPED_DIR.glob("*.pt")), ids=lambda p: p.stem)
def test_every_shipped_checkpoint_matches_its_sidecar_and_architecture(path):
    # what a fresh cache installs: the sha256 the loader checks, and weights that fit the model the sidecar names
    meta = json.loads(path.with_suffix(".json").read_text())
    assert pretrain.sha256_of(path) == meta["sha256"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float16, torch.int64) for v in state.values())
    model = build_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["width"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    assert 0.9 <= meta["test_accuracy"] <= 1.0 and path.stem.startswith(f"{meta['model']}-{meta['dataset']}-")
