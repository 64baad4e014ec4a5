from __future__ import annotations

import numpy as np
import pytest

from mmfed.data.layout import FederationLayout, load_layout, save_layout
from mmfed.data.partition import DirichletPartitioner, IidPartitioner
from mmfed.data.synthetic import SyntheticWorld


@pytest.fixture(scope="module")
def train():
    return SyntheticWorld(seed=0, n_train=300, n_public=1, n_val=1, n_test=1).split("train")


def test_layout_gives_each_kind_its_clients_disjoint_ids_and_local_test(train) -> None:
    layout = FederationLayout(image=2, text=3, paired=1, local_test_fraction=0.2)
    clients = layout.build(train, IidPartitioner(), np.random.default_rng(0))
    assert [c.cid for c in clients] == ["image-0", "image-1", "text-0", "text-1", "text-2", "paired-0"]
    all_ids = [i for c in clients for i in (*c.train_ids, *c.test_ids)]
    assert len(all_ids) == len(set(all_ids)) == len(train)  # disjoint and complete
    for client in clients:
        share = len(client.train_ids) + len(client.test_ids)
        assert abs(len(client.test_ids) - 0.2 * share) <= 1
        assert set(client.train_ids).isdisjoint(client.test_ids)
    # pools are proportional to the client counts: 2/6, 3/6, 1/6 of 300
    per_kind = {
        k: sum(c.num_examples + len(c.test_ids) for c in clients if c.kind == k)
        for k in ("image", "text", "paired")
    }
    assert per_kind == {"image": 100, "text": 150, "paired": 50}


def test_text_clients_are_partitioned_by_the_text_label(train) -> None:
    layout = FederationLayout(image=0, text=4, paired=0, local_test_fraction=0.0)
    clients = layout.build(
        train, DirichletPartitioner(alpha=0.05, min_partition_size=1), np.random.default_rng(1)
    )
    row = {sample_id: i for i, sample_id in enumerate(train.ids)}
    dominant = []
    for client in clients:
        labels = train.text_labels[[row[i] for i in client.train_ids]].numpy()
        counts = np.bincount(labels, minlength=4)
        dominant.append(counts.max() / counts.sum())
    assert np.mean(dominant) > 0.6  # strong skew on the scene label


def test_layout_round_trips_through_json(tmp_path, train) -> None:
    clients = FederationLayout(1, 1, 1).build(train, IidPartitioner(), np.random.default_rng(0))
    save_layout(clients, tmp_path / "partition.json", {"seed": 0})
    loaded, meta = load_layout(tmp_path / "partition.json")
    assert loaded == clients and meta == {"seed": 0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": -1}, "layout.image"),
        ({"image": 0, "text": 0, "paired": 0}, "at least one client"),
        ({"local_test_fraction": 1.0}, "local_test_fraction"),
    ],
)
def test_bad_layouts_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        FederationLayout(**kwargs)
