"""Run by ``torchrun`` from tests/test_distributed.py (and importable for its fixtures).

``python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_worker.py OUT`` audits the
model and data saved in OUT (map-style and streaming), fine-tunes with the DDP helper, and writes
``rank{r}.json`` per process (every process returns the report; rank 0 also writes the report JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

N_SAMPLES = 203  # 13 batches of 16: uneven over 2 processes (7 + 6), last batch short
BATCH = 16
BUMP = 0.6


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(128, 48), nn.ReLU(), nn.Linear(48, 10),
    )
    with torch.no_grad():  # spread the logits, and make class 3 easier to reach than the others
        net[0].weight *= 4.0
        net[4].weight *= 3.0
        net[6].weight *= 3.0
        net[6].bias[3] += BUMP
    return net


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(N_SAMPLES, 3, 12, 12, generator=g)
    y = torch.randint(0, 10, (N_SAMPLES,), generator=g)
    return X, y


def _gen(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"image": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "label": int(i % 10)}


def make_stream(n: int = 75, seed: int = 1):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return datasets.IterableDataset.from_generator(_gen, features=feats, gen_kwargs={"n": n, "seed": seed})


def summary(report) -> dict:
    return {
        "flagged": report.flagged,
        "target": report.target,
        "norms": report.norms.tolist(),
        "n": report.data["n"],
        "accuracy": report.data["accuracy"],
        "fingerprint": report.data["fingerprint"],
        "counts": [r.n_reference for r in report.classes],
        "num_processes": report.params.get("num_processes"),
        "pert_sum": float(np.abs(report.perturbations).sum()),
    }


def finetune(dist, X, y, batch: int) -> list[float]:
    """A few SGD steps with the DDP helper; returns the final parameters, flattened."""
    from hub_backdoor.distributed import finetune_loop

    net = make_model(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:192], y[:192]), batch_size=batch)

    def step(xb, yb):
        return {"loss": nn.functional.cross_entropy(net(xb), yb)}

    hist = finetune_loop(step, loader, opt, params=net.parameters(), epochs=2, dist=dist, model=net)
    return [float(hist[-1]["loss"])] + torch.cat([p.detach().reshape(-1) for p in net.parameters()]).tolist()


def kept_embeddings(accelerator) -> list[float]:
    """``reference_pass(keep_embeddings=True)``: labels and an order-sensitive checksum."""
    from hub_backdoor.adapters import TorchClassifier
    from hub_backdoor.detection.embeddings import reference_pass
    from hub_backdoor.sources.reference import ReferenceData

    X, y = make_data()
    ref = reference_pass(TorchClassifier(make_model(), head="6"), ReferenceData((X, y)), batch_size=BATCH,
                         keep_embeddings=True, progress=False, accelerator=accelerator)
    weights = np.arange(1, len(ref.labels) + 1)
    return [float(weights @ ref.labels), float(weights @ ref.embeddings.astype(np.float64).sum(1))]


def main(out: Path) -> None:
    from hub_backdoor import audit
    from hub_backdoor.adapters import TorchClassifier
    from hub_backdoor.distributed import resolve

    dist = resolve(None)  # an Accelerator: launched by torchrun
    X, y = make_data()
    clf = TorchClassifier(make_model(), head="6")
    rep = audit(clf, (X, y), rule="mad", batch_size=BATCH, progress=False)
    stream = audit(TorchClassifier(make_model(), head="6"), make_stream(), rule="mad", batch_size=8,
                   max_samples=70, progress=False)
    weights = finetune(dist, X, y, BATCH // dist.world)
    from hub_backdoor import purify

    res = purify(TorchClassifier(make_model(), head="6"), (X, y), report=rep, target=3, epochs=2,
                 batch_size=8, holdout=0.25, distill=0.0, progress=False, seed=0)
    purified = [float(p.detach().double().sum()) for p in res.model.parameters()]
    result = {"rank": dist.rank, "world": dist.world, "map": summary(rep), "stream": summary(stream),
              "finetune": weights, "embeddings": kept_embeddings(None), "purified": purified,
              "purify_history": res.history}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    if dist.is_main:
        rep.to_json(out / "report.json")
    # shut gloo down in step: a rank exiting while the other still talks aborts with SIGABRT
    import torch.distributed as td

    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
