"""Distributed audit: sharding, merging and the 2-process run against 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dist_worker as w
import numpy as np
import pytest
import torch

from hub_backdoor import audit
from hub_backdoor.adapters import TorchClassifier
from hub_backdoor.detection.reconstruction import ConstraintState, reconstruct, reconstruct_distributed
from hub_backdoor.distributed import Dist, resolve, shard_reference_loader
from hub_backdoor.errors import LabelRangeError
from hub_backdoor.sources.reference import Fingerprint, ReferenceData, StreamingReference, make_loader

ROOT = Path(__file__).resolve().parents[1]


def _fake(rank: int, world: int) -> Dist:
    """A Dist that only knows its place (no process group): for the sharding logic alone."""
    return Dist(SimpleNamespace(num_processes=world, process_index=rank, device="cpu"))


def test_single_process_dist_is_a_no_op():
    d = resolve(None)
    assert (d.world, d.rank, d.is_main, d.active) == (1, 0, True, False)
    t = torch.arange(4.0)
    assert torch.equal(d.all_reduce(t, "max"), t)
    assert d.all_gather_object({"a": 1}) == [{"a": 1}]
    assert d.broadcast_object(3) == 3
    with pytest.raises(LabelRangeError):
        d.run(lambda: (_ for _ in ()).throw(LabelRangeError("bad label")))
    assert resolve(d) is d and resolve(False).accelerator is None


def test_reference_shards_partition_without_repeats():
    X, y = torch.rand(23, 3, 4, 4), torch.arange(23) % 5
    data = ReferenceData((X, y))
    loader = make_loader(data, None, batch_size=4)
    seen = []
    for r in range(3):
        for xb, yb in shard_reference_loader(loader, _fake(r, 3)):
            seen.extend(yb.tolist())
            assert len(xb) == len(yb)
    assert sorted(seen) == sorted(y.tolist())  # every sample exactly once (no even_batches padding)


def test_stream_shards_partition_and_take():
    ds = w.make_stream(n=23)
    full = [(i, lab) for i, _img, lab in StreamingReference(ds).examples()]
    assert [i for i, _ in full] == list(range(23))
    ref = StreamingReference(ds).subset(17, seed=0)
    parts = [[(i, lab) for i, _img, lab in ref.examples(r, 2)] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == full[:17]
    assert all(i % 2 == r for r in range(2) for i, _ in parts[r])
    _i, img, _lab = next(ref.examples(1, 2))
    assert img.size == (12, 12)  # decoded by the process that keeps it


def test_fingerprint_is_order_and_shard_free():
    X, y = torch.rand(10, 3, 5, 5), torch.arange(10) % 3
    a = Fingerprint()
    a.update(X, y)
    b, c = Fingerprint(), Fingerprint()
    b.update(X[7:].flip(0), y[7:].flip(0))
    c.update(X[:7], y[:7])
    assert b.merge(c).hexdigest() == a.hexdigest()
    d = Fingerprint()
    X2 = X.clone()
    X2[4, 0, 0, 0] += 1e-3
    d.update(X2, y)
    assert d.hexdigest() != a.hexdigest()
    e = Fingerprint()
    e.update(X, (y + 1) % 3)
    assert e.hexdigest() != a.hexdigest()


def test_streaming_audit_equals_map_style_audit():
    from datasets import Dataset

    stream = w.make_stream(n=60)
    rows = [{"image": img, "label": lab} for _i, img, lab in StreamingReference(stream).examples()]
    table = Dataset.from_list(rows).cast(stream.features)
    kw = dict(rule="mad", batch_size=8, progress=False)
    a = audit(TorchClassifier(w.make_model(), head="6"), stream, **kw)
    b = audit(TorchClassifier(w.make_model(), head="6"), table, **kw)
    np.testing.assert_allclose(a.norms, b.norms, rtol=1e-9, atol=1e-12)
    assert a.data["fingerprint"] == b.data["fingerprint"]
    assert a.data["n"] == b.data["n"] == 60 and a.params["streaming"] and not b.params["streaming"]
    assert a.data["description"]["type"] == "datasets-streaming"


def test_reconstruct_distributed_single_process_is_reconstruct():
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 20)), rng.normal(size=6)
    st = ConstraintState.empty(6)
    st.update(torch.as_tensor(rng.normal(size=(40, 20)) @ W.T + b), torch.as_tensor(rng.integers(0, 6, 40)))
    a = reconstruct_distributed(W, b, st, Dist(None))
    np.testing.assert_array_equal(a.norms, reconstruct(W, b, st).norms)


@pytest.mark.distributed
def test_two_processes_give_the_same_report_as_one(tmp_path):
    """torchrun --standalone picks a free rendezvous port (not 29500), so it cannot collide."""
    launch_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "dist_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2-process torchrun audit: {time.perf_counter() - t0:.1f} s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    X, y = w.make_data()
    one = {
        "map": w.summary(audit(TorchClassifier(w.make_model(), head="6"), (X, y), rule="mad",
                               batch_size=w.BATCH, progress=False)),
        "stream": w.summary(audit(TorchClassifier(w.make_model(), head="6"), w.make_stream(), rule="mad",
                                  batch_size=8, max_samples=70, progress=False)),
    }
    assert one["map"]["flagged"] == [3]  # the test is about a real finding
    for r in ranks:
        for kind in ("map", "stream"):
            got, ref = r[kind], one[kind]
            assert got["num_processes"] == 2
            assert got["flagged"] == ref["flagged"] and got["target"] == ref["target"]
            np.testing.assert_allclose(got["norms"], ref["norms"], rtol=1e-6, atol=1e-9)
            assert got["n"] == ref["n"] and got["counts"] == ref["counts"]
            assert got["accuracy"] == ref["accuracy"]
            assert got["fingerprint"] == ref["fingerprint"]
            assert got["pert_sum"] == pytest.approx(ref["pert_sum"], rel=1e-6)
    # DDP semantics: 2 processes x batch 8 == 1 process x batch 16, and both processes agree
    single = w.finetune(Dist(None), X, y, w.BATCH)
    np.testing.assert_allclose(ranks[0]["finetune"], single, rtol=0, atol=1e-5)
    assert ranks[0]["finetune"] == ranks[1]["finetune"]
    # purify() trains under DDP: both processes end with the same weights, moved from the original
    assert ranks[0]["purified"] == ranks[1]["purified"]
    original = [float(p.detach().double().sum()) for p in w.make_model().parameters()]
    assert ranks[0]["purified"] != original and len(ranks[0]["purify_history"]) == 2
    assert json.loads((tmp_path / "report.json").read_text())["flagged"] == [3]
    # kept embeddings come back in sample order
    np.testing.assert_allclose(ranks[1]["embeddings"], w.kept_embeddings(False), rtol=1e-6)
