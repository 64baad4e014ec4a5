from __future__ import annotations

import torch

from mmfed.algorithms.base import ServerStep
from mmfed.data.layout import ClientSpec
from mmfed.federation.embedded import ClientStateStore
from mmfed.federation.server import Server
from mmfed.models.multimodal import LogitScale, MultimodalModel


def test_store_reads_the_newest_state_before_a_round_and_rolls_back(tmp_path) -> None:
    store = ClientStateStore(tmp_path)
    assert store.load("c", before_round=1) == {}
    store.save("c", 1, {"v": torch.tensor(1)})
    store.save("c", 2, {"v": torch.tensor(2)})
    store.save("c", 3, {"v": torch.tensor(3)})  # written by a round that never committed
    assert int(store.load("c", before_round=3)["v"]) == 2
    store.rollback(committed_round=2)
    assert int(store.load("c", before_round=10)["v"]) == 2  # round 3 is gone
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["round_00002.pt"]  # older pruned
    store.save("c", 4, {})  # empty state: nothing written
    assert len(list((tmp_path / "c").iterdir())) == 1


def test_client_sampling_is_seeded_per_round_and_independent_of_history() -> None:
    clients = [ClientSpec(f"image-{i}", "image", ("x",)) for i in range(10)]
    model = MultimodalModel({"logit_scale": LogitScale()})
    server = Server(model, {"noop": ServerStep()}, clients, seed=7, clients_per_round=4)
    first = [c.cid for c in server.sample(3)]
    assert len(first) == 4 and len(set(first)) == 4
    assert [c.cid for c in Server(model, {"noop": ServerStep()}, clients, 7, 4).sample(3)] == first
    assert any([c.cid for c in server.sample(r)] != first for r in range(4, 10))
    assert [c.cid for c in Server(model, {"noop": ServerStep()}, clients, 7, None).sample(1)] == [
        c.cid for c in clients
    ]


def test_client_batches_cover_each_row_once_and_never_end_with_a_single_sample() -> None:
    import numpy as np

    from mmfed.data.synthetic import SyntheticWorld
    from mmfed.federation.client import ClientData

    split = SyntheticWorld(seed=0, n_train=65, n_public=1, n_val=1, n_test=1).split("train")
    for kind in ("image", "text", "paired"):
        batches = list(ClientData(split, kind).batches(np.random.default_rng(0), batch_size=16))
        sizes = [len(b.get("captions", b.get("images"))) for b in batches]
        assert sizes == [16, 16, 16, 17]  # 65 = 16 + 16 + 16 + 17: the lone 65th row joined the last batch
        if kind != "image":
            captions = [c for b in batches for c in b["captions"]]
            assert all(any(c in row for row in split.captions) for c in captions)
        if kind == "text":
            assert "images" not in batches[0]


def test_a_reply_is_a_snapshot_not_a_view_of_the_pooled_model() -> None:
    """Two clients of one kind share a pooled model; the first one's reply must not change when the
    second trains it (`encode_tensors` copies; the engines add no second copy)."""
    from mmfed.cli import compose
    from mmfed.federation.run import Federation
    from mmfed.protocol import Payload

    federation = Federation(
        compose(["experiment=smoke", "layout.image=2", "layout.text=0", "layout.paired=0"])
    )
    payload = Payload(stage="fit", round=1, reply=["weights"])
    first, _ = federation.client_app("image-0")(payload, {})
    sent = {name: tensor.clone() for name, tensor in first.tensors.items()}
    federation.client_app("image-1")(payload, {})
    assert sent.keys() == first.tensors.keys()
    assert all(torch.equal(sent[name], first.tensors[name]) for name in sent)
