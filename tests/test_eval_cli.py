"""`mmfed eval RUN_DIR protocol=...`: tiny real-data runs, the protocols' numbers recomputed independently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmfed.cli import compose, main
from mmfed.data.sources import Cifar10, Coco, Flickr30k
from mmfed.eval_protocols import encode
from mmfed.federation.run import Federation, train
from mmfed.metrics import classification_accuracy, retrieval_recall
from mmfed.utils.io import load_torch
from tests.data.fixtures import write_cifar10, write_karpathy

pytestmark = pytest.mark.slow
TINY_MODEL = [
    "model.embed_dim=16",
    "model.image_encoder.width=8",
    "model.text_encoder.width=16",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "training.batch_size=8",
    "training.local_epochs=1",
    "partition.min_partition_size=1",
    "rounds=1",
    "quiet=true",
]


@pytest.fixture(scope="module")
def flickr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-round run of paired clients on the Flickr30k fixture (images at 32 px for the small CNN)."""
    base = tmp_path_factory.mktemp("flickr")
    write_karpathy(base / "flickr30k", "flickr30k", counts={"train": 24, "val": 6, "test": 10})
    cfg = compose(
        [
            *TINY_MODEL,
            "data=flickr30k",
            f"data.root={base / 'flickr30k'}",
            "data.image_size=32",
            "layout.image=0",
            "layout.text=0",
            "layout.paired=2",
            f"run_dir={base / 'run'}",
        ]
    )
    train(cfg)
    return base / "run"


def _model(run: Path) -> torch.nn.Module:
    cfg = OmegaConf.load(run / "config.yaml")
    model = Federation(cfg).global_model()
    model.load_state_dict(load_torch(run / "checkpoints" / "best.pt"))
    return model.eval()


def _saved(run: Path, protocol: str) -> dict:
    return json.loads((run / "eval" / f"{protocol}.json").read_text())


def test_flickr30k_1k_matches_an_independent_computation(
    flickr_run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["eval", str(flickr_run), "protocol=flickr30k-1k"]) == 0
    out, err = capsys.readouterr()
    assert "retrieval/rsum" in out and "encoding test images" not in err  # the table; no bar off a terminal
    result = _saved(flickr_run, "flickr30k-1k")
    assert (result["images"], result["captions"], result["split"]) == (10, 50, "test")
    assert result["checkpoint"].endswith("best.pt") and "folds" not in result
    test = Flickr30k(root=str(flickr_run.parent / "flickr30k"), image_size=32).split("test")
    with torch.no_grad():
        model = _model(flickr_run)
        images = model.encode_images(test.images[0:10])
        texts, rows, _ = test.flat_captions()
        expected = retrieval_recall(images, model.encode_texts(texts), rows)
    metrics = result["metrics"]
    for key in ("i2t/R@1", "i2t/R@5", "i2t/R@10", "t2i/R@1", "t2i/R@5", "t2i/R@10", "rsum"):
        assert metrics[f"retrieval/{key}"] == pytest.approx(expected[key], abs=1e-4), key
    assert metrics["retrieval/rsum@1"] == pytest.approx(expected["i2t/R@1"] + expected["t2i/R@1"], abs=1e-4)


def test_coco_1k_fold_arithmetic_and_5k(flickr_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_karpathy(root, "coco", counts={"train": 3, "restval": 1, "val": 2, "test": 10})
    common = [f"data.root={root}", "data.image_size=32", "quiet=true"]
    assert main(["eval", str(flickr_run), "protocol=coco-1k", "fold_size=4", *common]) == 0
    assert main(["eval", str(flickr_run), "protocol=coco-5k", *common]) == 0
    folded, full = _saved(flickr_run, "coco-1k"), _saved(flickr_run, "coco-5k")
    assert (folded["folds"], folded["fold_size"], folded["images_left_out"]) == (2, 4, 2)
    assert folded["images"] == full["images"] == 10 and full["captions"] == 50  # 5 per image, not 7

    test = Coco(root=str(root), image_size=32).split("test")
    image_emb, text_emb, rows, _ = encode(_model(flickr_run), test)
    per_fold = []
    for fold in range(2):  # images 4f..4f+3 and exactly their captions, image indices made fold-local
        caps = (rows >= 4 * fold) & (rows < 4 * fold + 4)
        per_fold.append(
            retrieval_recall(image_emb[4 * fold : 4 * fold + 4], text_emb[caps], rows[caps] - 4 * fold)
        )
    whole = retrieval_recall(image_emb, text_emb, rows)
    for key in ("i2t/R@1", "t2i/R@1", "t2i/R@5", "rsum"):
        mean = sum(f[key] for f in per_fold) / 2
        assert folded["metrics"][f"retrieval/{key}"] == pytest.approx(mean, abs=1e-4), key
        assert full["metrics"][f"retrieval/{key}"] == pytest.approx(whole[key], abs=1e-4), key
    assert folded["metrics"]["retrieval/rsum"] != pytest.approx(full["metrics"]["retrieval/rsum"])


def test_classification_protocol_and_checkpoint_choice(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar10", per_batch=12, n_test=20)
    cfg = compose(
        [
            *TINY_MODEL,
            "data=cifar10",
            f"data.root={tmp_path / 'cifar10'}",
            "layout.image=2",
            "layout.text=0",
            "layout.paired=0",
            "evaluation.selection_metric=classification/image/acc",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    train(cfg)
    run = tmp_path / "run"
    assert main(["eval", str(run), "protocol=cifar10", "checkpoint=last", "quiet=true"]) == 0
    result = _saved(run, "cifar10")
    assert result["checkpoint"].endswith("last.pt") and set(result["metrics"]) == {"classification/image/acc"}
    test = Cifar10(root=str(tmp_path / "cifar10")).split("test")
    model = _model(run)  # one round: best == last
    with torch.no_grad():
        logits = model.image_head(model.encode_images(test.images[0:20]))
    expected = classification_accuracy(logits, test.image_labels, 10)
    assert result["metrics"]["classification/image/acc"] == pytest.approx(expected, abs=1e-4)
    assert result["images"] == 20 and result["captions"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["protocol=coco-9k"], "protocol='coco-9k' is not one of coco-1k, coco-5k"),
        ([], "missing protocol=..."),
        (["protocol=coco-5k", "colour=red"], "unknown option 'colour'"),
        (["protocol=coco-5k", "checkpoint=nope"], "checkpoint .*nope not found"),
        (["protocol=coco-5k", "data.nonsense=1"], "nonsense"),
        (
            ["protocol=coco-1k", "quiet=true", "fold_size=8"],
            "has 10 images, fewer than two folds of fold_size=8",
        ),
    ],
)
def test_bad_input_is_one_line(
    flickr_run: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    root = tmp_path / "coco"
    write_karpathy(root, "coco", counts={"train": 2, "val": 1, "test": 10})
    assert main(["eval", str(flickr_run), *args, f"data.root={root}", "data.image_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfed: error: ") and "\n" not in err
    import re

    assert re.search(message, err), err


def test_missing_run_folder_or_data(tmp_path: Path, flickr_run: Path, capsys, monkeypatch) -> None:
    assert main(["eval", str(tmp_path / "nothing"), "protocol=coco-5k"]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MMFED_DATA_DIR", str(tmp_path / "data"))
    assert main(["eval", str(flickr_run), "protocol=coco-5k"]) == 2
    err = capsys.readouterr().err
    assert "dataset 'coco' not found" in err and str(tmp_path / "data" / "coco") in err
    assert "yerevann/coco-karpathy" in err and "HF_HUB_OFFLINE" in err


def test_protocol_data_comes_from_the_runs_composite_config(tmp_path: Path) -> None:
    from mmfed.data.sources import get_protocol
    from mmfed.eval_protocols import protocol_data_config

    cfg = compose(["experiment=creamfl_real", f"data.eval_data.coco.root={tmp_path / 'coco'}"])
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))  # as saved in config.yaml
    targets = {name: protocol_data_config(data, get_protocol(name)) for name in cfg.data.protocols}
    assert targets["coco-1k"].root == str(tmp_path / "coco") == targets["coco-5k"].root  # eval_data.coco
    assert targets["flickr30k-1k"]._target_.endswith("Flickr30k")  # the paired role
    assert targets["cifar100"]._target_.endswith("Cifar100") and targets["agnews"]._target_.endswith("AgNews")
    other = protocol_data_config(data, get_protocol("cifar10"))  # not in the run: the dataset's defaults
    assert other._target_.endswith("Cifar10") and other.root is None
    with pytest.raises(Exception, match="colour"):
        other.colour = "red"  # typed by the structured config: unknown keys fail, naming the key
