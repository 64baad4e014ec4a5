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


def test_domain_skew_partitions_by_the_rows_style_and_leaves_labels_mixed() -> None:
    styles = ("photo", "inverted", "grey", "swapped")
    split = SyntheticWorld(seed=0, n_train=600, n_public=1, n_val=1, n_test=1, styles=styles).split("train")
    clients = FederationLayout(image=3, text=0, paired=0, local_test_fraction=0.0, skew="domain").build(
        split, DirichletPartitioner(alpha=0.05, min_partition_size=1), np.random.default_rng(0)
    )
    row = {sample_id: i for i, sample_id in enumerate(split.ids)}
    per_client = []
    for client in clients:
        rows = [row[i] for i in client.train_ids]
        per_client.append(np.bincount(split.domains[rows].numpy(), minlength=4))
        labels = np.bincount(split.image_labels[rows].numpy(), minlength=10)
        if len(rows) >= 100:
            assert labels.max() / labels.sum() < 0.3  # classes stay mixed (10 classes)
    domains = np.stack(per_client)  # [client, domain]
    assert (
        domains.max(axis=0) / domains.sum(axis=0) > 0.6
    ).all()  # each style sits mostly with one client (IID: 1/3)


def test_domain_skew_without_domains_names_the_option(train) -> None:
    with pytest.raises(ValueError, match=r"layout.skew=domain .* data.styles"):
        FederationLayout(skew="domain").build(train, IidPartitioner(), np.random.default_rng(0))


def test_the_bounds_are_layouts_of_the_federations_rows(train) -> None:
    partitioner, federated = DirichletPartitioner(alpha=0.1, min_partition_size=1), FederationLayout()
    clients = federated.build(train, partitioner, np.random.default_rng(3))
    pooled = FederationLayout(pooled=True).build(train, partitioner, np.random.default_rng(3))
    assert [(c.cid, c.kind) for c in pooled] == [
        ("image-0", "image"),
        ("text-0", "text"),
        ("paired-0", "paired"),
    ]
    for spec in pooled:
        mine = [c for c in clients if c.kind == spec.kind]
        assert set(spec.train_ids) == {i for c in mine for i in c.train_ids}
        assert set(spec.test_ids) == {i for c in mine for i in c.test_ids}
    alone = FederationLayout(only="paired-1").build(train, partitioner, np.random.default_rng(3))
    assert alone == [c for c in clients if c.cid == "paired-1"]
    with pytest.raises(ValueError, match=r"layout.only='paired-7' is not a client .* paired-2"):
        FederationLayout(only="paired-7").build(train, partitioner, np.random.default_rng(3))
    with pytest.raises(ValueError, match="exclude each other"):
        FederationLayout(pooled=True, only="image-0")
    with pytest.raises(ValueError, match="layout.skew must be one of label, domain"):
        FederationLayout(skew="style")
