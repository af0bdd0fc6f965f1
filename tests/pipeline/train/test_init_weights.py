"""train.init_weights: a local torchvision state dict is loaded; a download that cannot happen fails at once."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.config import ConfigError, params_from_dict
from pipeline.train.init_weights import download_checkpoint, resolve_init_weights
from pipeline.train.loop import TrainJob, build_model
from tests.coco_host import serve
from tests.train_samples import tiny_params


def test_local_imagenet_resnet_state_dict_initialises_the_bottom_up_pathway(tmp_path: Path) -> None:
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    params = params_from_dict(tiny_params(init_weights=str(path)))
    assert resolve_init_weights(params) == str(path.resolve())

    job = TrainJob(
        params=params, data_root="unused", run_name="t", data_hash="h", git_commit="c",
        tracking_uri=None, init_weights_file=resolve_init_weights(params),
    )  # fmt: skip
    model = build_model(job, restored=None)
    ours = model.state_dict()
    assert torch.equal(ours["backbone.conv1.weight"], resnet.conv1.weight)
    assert torch.equal(ours["backbone.layer4.1.conv2.weight"], resnet.layer4[1].conv2.weight)
    # A restored checkpoint wins over init_weights.
    restored = build_model(job, restored={"model": {k: torch.zeros_like(v) for k, v in ours.items()}})
    assert restored.state_dict()["backbone.conv1.weight"].abs().sum() == 0


def _online(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def test_offline_download_fails_at_once_naming_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _online("download.pytorch.org"):
        pytest.skip("download.pytorch.org resolves here: the offline error cannot happen")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    params = params_from_dict(tiny_params(init_weights="imagenet"))
    with pytest.raises(ConfigError) as caught:
        resolve_init_weights(params)
    message = str(caught.value)
    assert message.startswith(
        "train.init_weights: 'imagenet' needs https://download.pytorch.org/models/resnet18-"
    )
    assert "set train.init_weights to its local path" in message
    assert not any(tmp_path.rglob("*.pth")), "no half-downloaded file left"


def test_download_is_verified_against_the_hash_in_its_name(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    payload = b"weights" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    (served / f"resnet18-{digest[:8]}.pth").write_bytes(payload)
    (served / "resnet34-0123abcd.pth").write_bytes(payload)  # its name's hash is wrong
    with serve(served) as host:
        good = tmp_path / "cache" / f"resnet18-{digest[:8]}.pth"
        download_checkpoint(f"{host.url}/resnet18-{digest[:8]}.pth", good)
        assert good.read_bytes() == payload

        bad = tmp_path / "cache" / "resnet34-0123abcd.pth"
        with pytest.raises(RuntimeError, match="invalid hash value"):
            download_checkpoint(f"{host.url}/resnet34-0123abcd.pth", bad)
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [good.name], "nothing half-written"
