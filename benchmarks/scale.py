"""Scale benchmark: QP time against C, an ImageNet-size head, audit overhead, streaming memory.

    python -m benchmarks.scale all --out docs/scale-results.json   # everything (~15-25 min, 2 CPUs)
    python -m benchmarks.scale qp --classes 100,1000,10000
    python -m benchmarks.scale head            # timm resnet50 (random weights), C = 1000, d = 2048
    python -m benchmarks.scale classes         # the default audit of a 224-px ResNet-18 at C = 10, 100, 1000
    python -m benchmarks.scale overhead        # audit time / plain inference time
    python -m benchmarks.scale memory --sizes 2000,20000   # streaming audit peak RSS, one process per size
    python -m benchmarks.scale group           # fine-tunes one by one against stacked (benchmarks/group.py)
    python -m benchmarks.scale ... --device cuda           # the overhead part on a GPU

Every part prints one JSON object per measurement and a summary; ``--out`` also writes them all
to one JSON file with the machine description. Wall times on a shared machine are noisy: repeated
measurements report their minimum and every raw value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def emit(rec: dict[str, Any], sink: list[dict[str, Any]]) -> None:
    sink.append(rec)
    print(json.dumps(rec), flush=True)


# -- QP time against C ---------------------------------------------------------------------------------
def random_head_state(C: int, d: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Any]:
    """A random ``(W, b)`` (timm's default Linear init scale) and the state of n random post-ReLU
    embeddings; labels uniform over C."""
    from hub_backdoor.detection.reconstruction import ConstraintState, fold_worst

    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / np.sqrt(d)
    W = (torch.rand(C, d, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * bound
    H = torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (n,), generator=g)
    worst = torch.full((C, C), -torch.inf, dtype=torch.float64)
    worst.fill_diagonal_(0.0)
    for i in range(0, n, 16):
        fold_worst(worst, H[i : i + 16] @ W.T + b, y[i : i + 16])
    counts = np.bincount(y.numpy(), minlength=C)
    return W.numpy(), b.numpy(), ConstraintState(worst=worst.numpy(), counts=counts)


def bench_qp(classes: list[int], *, d: int = 2048, n_ref: int = 128, sample: int = 200,
             cvxpy_sample: int = 1, cvxpy_max_c: int = 1000, sink: list[dict[str, Any]]) -> None:
    """Fast-solver time for all classes against C (d = max(d, C + 240) so Theorem 1 holds).

    Up to 2000 classes all classes are solved and timed through ``reconstruct()``; above that the
    ``(C, C)`` Gram matrix and the feasibility check are timed, ``sample`` classes are solved with
    it, and the total is extrapolated (labelled as such).
    """
    from hub_backdoor.detection.reconstruction import check_feasibility, reconstruct, solve_class

    for C in classes:
        dd = max(d, C + 240)
        t0 = time.perf_counter()
        W, b, st = random_head_state(C, dd, n_ref, seed=C)
        t_state = time.perf_counter() - t0
        rec: dict[str, Any] = {"part": "qp", "C": C, "d": dd, "n_ref": n_ref, "state_seconds": t_state}
        if C <= 2000:
            r = reconstruct(W, b, st)
            per = np.asarray(r.per_class_seconds)
            rec.update(total_seconds=r.seconds, measured="all classes",
                       per_class_median=float(np.median(per)), per_class_max=float(per.max()),
                       fallback_notes=r.notes)
            norms = r.norms
        else:
            t0 = time.perf_counter()
            K = W @ W.T
            t_gram = time.perf_counter() - t0
            t0 = time.perf_counter()
            reason = check_feasibility(W, gram=K)
            t_check = time.perf_counter() - t0
            ks = np.random.default_rng(0).choice(C, size=min(sample, C), replace=False)
            from hub_backdoor.detection.reconstruction import _single_threaded_blas

            per_l = []
            norms = np.full(C, np.nan)
            with _single_threaded_blas():
                for k in ks:
                    sol = solve_class(W, b, st.worst, int(k), gram=K)
                    per_l.append(sol.seconds)
                    norms[k] = sol.norm
            per = np.asarray(per_l)
            rec.update(gram_seconds=t_gram, feasibility_seconds=t_check, feasible=reason is None,
                       measured=f"{len(ks)} of {C} classes, extrapolated",
                       per_class_median=float(np.median(per)), per_class_mean=float(per.mean()),
                       total_seconds=t_gram + t_check + C * float(per.mean()))
            del K
        if C <= cvxpy_max_c and cvxpy_sample:
            ks = [k for k in range(C) if np.isfinite(norms[k])][:cvxpy_sample]
            cv = reconstruct(W, b, st, solver="cvxpy", classes=ks)
            rec["cvxpy_per_class_seconds"] = [cv.per_class_seconds[k] for k in ks]
            rec["cvxpy_max_rel_norm_diff"] = float(max(abs(cv.norms[k] - norms[k]) / max(norms[k], 1e-12)
                                                       for k in ks))
        emit(rec, sink)
        del W, st


# -- an ImageNet-size head through the real pipeline -----------------------------------------------------
def _random_images(n: int, res: int, C: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8),
            torch.randint(0, C, (n,), generator=g))


class Normalize:
    """uint8 CHW tensor -> ImageNet-normalised float tensor (the benchmark's transform)."""

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float() / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return "Normalize(imagenet)"


def bench_head(*, n: int = 64, res: int = 64, cvxpy_sample: int = 2, soft_sample: int = 3,
               sink: list[dict[str, Any]]) -> None:
    """timm resnet50 with random weights (d = 2048, C = 1000): reference pass, all 1000 classes with
    the fast solver, cvxpy on a sample; resnet18 with 1000 classes (C - 1 >= d = 512)."""
    import timm

    from hub_backdoor.adapters import load_classifier
    from hub_backdoor.detection.embeddings import reference_pass
    from hub_backdoor.detection.reconstruction import reconstruct
    from hub_backdoor.sources.reference import ReferenceData

    torch.manual_seed(0)
    clf = load_classifier(timm.create_model("resnet50", pretrained=False, num_classes=1000))
    X, y = _random_images(n, res, 1000)
    data = ReferenceData((X, y))
    ref = reference_pass(clf, data, transform=Normalize(), batch_size=32, progress=False)
    W, b = clf.head_numpy()
    fast = reconstruct(W, b, ref.state)
    ks = list(range(cvxpy_sample))
    cv = reconstruct(W, b, ref.state, solver="cvxpy", classes=ks)
    diffs = [abs(cv.norms[k] - fast.norms[k]) / fast.norms[k] for k in ks] or [float("nan")]
    emit({
        "part": "head", "model": "timm resnet50 (random weights)", "C": clf.num_classes, "d": clf.embed_dim,
        "n_ref": ref.n, "input": f"{res}x{res}", "reference_pass_seconds": ref.seconds,
        "fast_all_classes_seconds": fast.seconds,
        "fast_per_class_median": float(np.median(fast.per_class_seconds)),
        "cvxpy_classes": ks, "cvxpy_per_class_seconds": [cv.per_class_seconds[k] for k in ks],
        "cvxpy_max_rel_norm_diff": float(max(diffs)), "fast_notes": fast.notes,
        "goal_30s_met": bool(fast.seconds <= 30.0), "goal_1e-6_met": bool(max(diffs) <= 1e-6),
    }, sink)

    small = load_classifier(timm.create_model("resnet18", pretrained=False, num_classes=1000))
    ref18 = reference_pass(small, data, transform=Normalize(), batch_size=32, progress=False)
    W, b = small.head_numpy()
    exact = reconstruct(W, b, ref18.state)
    soft = reconstruct(W, b, ref18.state, soft_margin=1.0, classes=list(range(soft_sample)))
    emit({
        "part": "head-c-above-d", "model": "timm resnet18 (random weights)", "C": small.num_classes,
        "d": small.embed_dim, "exact_seconds": exact.seconds, "notes": exact.notes,
        "unreachable_classes": int(np.isinf(exact.norms).sum()),
        "soft_margin_per_class_seconds": [soft.per_class_seconds[k] for k in range(soft_sample)],
    }, sink)


def fitted_resnet18(C: int, *, res: int, per_class: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """A timm ResNet-18 (random backbone) whose head is fitted to its reference features, so that
    the audit passes the reference gate and runs every stage; and its reference set.

    The images are ``per_class`` noisy copies of one random prototype per class (uint8, ``res``
    px); the head is the nearest-class-mean classifier of their embeddings (``w_k = mu_k``,
    ``b_k = -||mu_k||^2 / 2``). Returns ``(model, images, labels)``.
    """
    import timm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=C).eval()
    proto = torch.randint(0, 256, (C, 3, res, res), generator=g).float()
    y = torch.arange(C).repeat_interleave(per_class)
    noise = 12.0 * torch.randn(len(y), 3, res, res, generator=g)
    X = (proto[y] + noise).clamp(0, 255).to(torch.uint8)
    from hub_backdoor import zoo
    from hub_backdoor.adapters import load_classifier

    norm = Normalize()
    zoo.fit_mean_head(load_classifier(model), model.get_classifier(), torch.stack([norm(x) for x in X]), y)
    return model, X, y


#: The cost goal of a 1,000-class 224-px audit on 2 cores, every stage running.
CLASSES_GOAL_S = 15 * 60


def classes_table(rows: list[dict[str, Any]], *, res: int, per_class: int) -> str:
    """The Markdown table of :func:`bench_classes`' rows."""
    lines = [f"Default audit of a timm ResNet-18 at {res} px, {per_class} reference images a class, head "
             f"fitted to its reference features; {machine()['cpus']} CPUs, torch threads "
             f"{torch.get_num_threads()}.", "",
             "| C | d | images | classes searched | reference pass s | QP s | input search s | total s "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec in rows:
        t = rec["timings"]
        lines.append(f"| {rec['C']} | {rec['d']} | {rec['n_ref']} | {rec['searched']} | "
                     f"{t.get('reference_pass', 0):.0f} | {t.get('qp', 0):.1f} | "
                     f"{t.get('input_verification', float('nan')):.0f} | {rec['seconds']:.0f} | "
                     f"{rec['verdict']} |")
    big = [rec for rec in rows if rec["C"] >= 1000]
    if big:
        secs = big[-1]["seconds"]
        lines += ["", f"Goal: C = {big[-1]['C']:,} audited within {CLASSES_GOAL_S / 60:.0f} minutes: "
                      f"{'**met**' if secs <= CLASSES_GOAL_S else '**missed**'} ({secs / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def bench_classes(*, classes: list[int], res: int, per_class: int, sink: list[dict[str, Any]],
                  out: Path | None = None) -> str:
    """The default audit (every stage) of a 224-px ResNet-18 at several class counts, side by side:
    ``per_class`` reference images a class, a head fitted to its reference features
    (:func:`fitted_resnet18`) so that no data gate stops it early."""
    from hub_backdoor import audit

    rows = []
    for C in classes:
        model, X, y = fitted_resnet18(C, res=res, per_class=per_class)
        t0 = time.perf_counter()
        r = audit(model, (X, y), transform=Normalize(), progress=False)
        total = time.perf_counter() - t0
        stages = [st["stage"] for st in r.evidence.get("stages", [])]
        rec = {"part": "classes", "model": "timm resnet18 (random backbone, fitted head)", "C": C,
               "d": int(r.model["embed_dim"]), "input": f"{res}x{res}", "n_ref": int(r.data["n"]),
               "reference_accuracy": float(r.data["accuracy"]), "verdict": r.verdict, "reason": r.reason,
               "stages": stages, "timings": r.timings, "seconds": total,
               "unreachable_classes": int(sum(1 for c in r.classes if not np.isfinite(c.norm))),
               "searched": next((int(st.get("classes", 0)) for st in r.evidence.get("stages", [])
                                 if st["stage"] == "additive verification"), 0)}
        emit(rec, sink)
        rows.append(rec)
        if out is not None:  # after every class count: a stopped run keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
            out.with_suffix(".md").write_text(classes_table(rows, res=res, per_class=per_class))
    table = classes_table(rows, res=res, per_class=per_class)
    print("\n" + table)
    return table


def _plain_inference(
    clf: Any, data: Any, transform: Any, batch_size: int, device: str
) -> tuple[float, float]:
    """Wall and CPU seconds of ``model(x)`` over the reference loader (the baseline)."""
    from hub_backdoor.sources.reference import make_loader

    model = clf.model.to(device).eval()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x, _y in make_loader(data, transform, batch_size=batch_size):
            out = model(x.to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    del out
    return time.perf_counter() - t0, time.process_time() - c0


def bench_overhead(*, configs: list[tuple[str, int, int, int]], repeats: int = 2, batch_size: int = 64,
                   device: str = "cpu", sink: list[dict[str, Any]]) -> None:
    """Audit (``rule="mad"``, fast solver) against a plain ``model(x)`` loop over the same loader.

    ``configs``: ``(timm model name, classes, input resolution, number of images)``. Runs
    alternate (inference, audit, inference, audit, ...). On a CPU the ratio is taken on process
    CPU time (minimum over repeats), which other jobs on a shared machine do not inflate; wall
    times are reported beside it. On a GPU the ratio is taken on wall time.
    """
    import timm

    from hub_backdoor import audit
    from hub_backdoor.adapters import load_classifier
    from hub_backdoor.sources.reference import ReferenceData

    for name, C, res, n in configs:
        torch.manual_seed(0)
        clf = load_classifier(timm.create_model(name, pretrained=False, num_classes=C))
        X, y = _random_images(n, res, C)
        data = ReferenceData((X, y))
        tf = Normalize()
        _plain_inference(clf, data.view(np.arange(min(n, batch_size))), tf, batch_size, device)  # warm-up
        plain, plain_cpu, full, full_cpu, passes, qps = [], [], [], [], [], []
        for _ in range(repeats):
            wall, cpu = _plain_inference(clf, data, tf, batch_size, device)
            plain.append(wall)
            plain_cpu.append(cpu)
            c0 = time.process_time()
            rep = audit(clf, (X, y), transform=tf, rule="mad", batch_size=batch_size, device=device,
                        progress=False)
            full_cpu.append(time.process_time() - c0)
            full.append(rep.timings["total"])
            passes.append(rep.timings["reference_pass"])
            qps.append(rep.timings["qp"])
        on_gpu = device.startswith("cuda")
        p, a = (min(plain), min(full)) if on_gpu else (min(plain_cpu), min(full_cpu))
        fixed = min(qps)
        # the reference pass's own overhead, and the n from which the total stays <= 1.05
        pass_ratio = (min(full_cpu) - fixed) / p if not on_gpu else min(passes) / p
        need = None
        if pass_ratio < 1.05:
            need = int(np.ceil(fixed / ((1.05 - pass_ratio) * (p / n))))
        emit({
            "part": "overhead", "model": f"timm {name} (random weights)", "C": C, "input": f"{res}x{res}",
            "n": n, "device": device, "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
            "ratio_on": "wall" if on_gpu else "cpu time", "plain_wall": plain, "plain_cpu": plain_cpu,
            "audit_wall": full, "audit_cpu": full_cpu, "reference_pass_wall": passes, "qp_wall": qps,
            "ratio_total": a / p, "ratio_reference_pass": pass_ratio, "n_for_ratio_1.05": need,
        }, sink)


# -- fine-tunes one by one against stacked in a group -----------------------------------------------------
def _kernels(fn: Any) -> int:
    """GPU kernels one call of ``fn`` launches (torch.profiler's CUDA events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def bench_group(*, arch: str, sizes: list[int], steps: int = 6, device: str = "cpu", mode: str = "finetune",
                sink: list[dict[str, Any]]) -> None:
    """G models run one by one (the reference loops) and as one stacked group of G
    (:func:`benchmarks.group.fit`), side by side: wall seconds per model and step, and on CUDA
    the kernels launched per model and step (the ratios are what stacking saves). ``mode``:
    "finetune" (a baseline's fine-tune: cross-entropy, every layer; batch 64, shared data) or "train"
    (the zoo's training: cross-entropy, batch 256, each model its own data). 32x32 inputs. Setup
    (copying and stacking the weights) is inside the timing."""
    from benchmarks import baselines, core, group
    from benchmarks.models import build

    dev = torch.device(device)
    bs = 64 if mode == "finetune" else 256
    X = torch.randn(bs * steps, 1, 32, 32, device=dev)
    Y = torch.randint(0, 10, (bs * steps,), device=dev)
    src = build(arch, 10, 1, 32, seed=0)
    src.model.to(dev)

    def alone(g: int) -> None:
        for i in range(g):
            if mode == "finetune":
                baselines.unlearn_train(src.copy(), X, Y, epochs=1, lr=0.003, bs=bs, seed=0)
            else:
                core.train_model(src.copy(), X, Y, epochs=1, lr=0.05, bs=bs, seed=i)

    def grouped(g: int) -> None:
        if mode == "finetune":
            members = [group.Member(clf=src.copy(), lr=0.003) for _ in range(g)]
            group.fit(members, X, Y, epochs=1, bs=bs)
        else:  # own data each (the same tensor: the gather is what counts)
            members = [group.Member(clf=src.copy(), lr=0.05, seed=i, X=X, Y=Y) for i in range(g)]
            group.fit(members, None, None, epochs=1, bs=bs, nesterov=True)

    for g in sizes:
        rec: dict[str, Any] = {"part": "group", "mode": mode, "arch": arch, "G": g, "device": device,
                               "batch_size": bs, "steps": steps, "torch_threads": torch.get_num_threads()}
        for name, fn in (("alone", alone), ("group", grouped)):
            fn(1)  # warm-up (cuDNN autotuning, allocator)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(g)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            per = g * steps
            rec[f"{name}_ms_per_model_step"] = 1000 * wall / per
            if device.startswith("cuda"):
                rec[f"{name}_kernels_per_model_step"] = _kernels(lambda fn=fn, g=g: fn(g)) / per
        rec["speedup_wall"] = rec["alone_ms_per_model_step"] / rec["group_ms_per_model_step"]
        if device.startswith("cuda"):
            rec["kernel_ratio"] = rec["alone_kernels_per_model_step"] / rec["group_kernels_per_model_step"]
        emit(rec, sink)


# -- streaming memory -------------------------------------------------------------------------------------
def _gen_images(n: int, res: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"image": rng.integers(0, 256, (res, res, 3), dtype=np.uint8), "label": i % 10}


def memory_child(n: int, res: int, batch_size: int) -> dict[str, Any]:
    """One streaming audit in this process; peak RSS before and after (run in a fresh process)."""
    import datasets
    from torch import nn

    from hub_backdoor import audit
    from hub_backdoor.adapters import TorchClassifier

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 10),
    )
    clf = TorchClassifier(net, head="7")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.IterableDataset.from_generator(_gen_images, features=feats,
                                                 gen_kwargs={"n": n, "res": res, "seed": 0})
    # warm the code paths on a few samples, so one-time allocations do not count as growth
    audit(clf, ds, max_samples=2 * batch_size, rule="mad", batch_size=batch_size, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rep = audit(clf, ds, rule="mad", batch_size=batch_size, progress=False)
    secs = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": rep.data["n"], "seconds": secs, "peak_rss_mib_before": before / 1024,
            "peak_rss_mib": after / 1024, "growth_mib": (after - before) / 1024}


def bench_memory(*, sizes: list[int], res: int = 32, batch_size: int = 64,
                 sink: list[dict[str, Any]]) -> None:
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale", "_memory_child", "--n", str(n), "--res", str(res),
             "--batch-size", str(batch_size)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(rec)
        emit({"part": "memory", "res": res, "batch_size": batch_size, **rec}, sink)
    base = rows[0]["peak_rss_mib"]
    emit({"part": "memory-summary", "sizes": sizes, "peak_rss_mib": [r["peak_rss_mib"] for r in rows],
          "ratio_largest_to_smallest": rows[-1]["peak_rss_mib"] / base,
          "goal_within_10pct": bool(rows[-1]["peak_rss_mib"] <= 1.10 * base)}, sink)


# -- CLI --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["all", "qp", "head", "classes", "overhead", "memory", "group",
                                     "_memory_child"])
    ap.add_argument("--out", type=Path, default=None, help="write all results to this JSON file")
    ap.add_argument("--classes", default=None,
                    help="qp: class counts (default 100,1000,10000); classes: (default 10,100,1000)")
    ap.add_argument("--per-class", type=int, default=2, help="classes: reference images a class")
    ap.add_argument("--sizes", default="2000,20000", help="memory: numbers of streamed images")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overhead", default="resnet18:10:32:2000,resnet50:1000:128:256",
                    help="overhead configs model:classes:resolution:images, comma separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--group", default="preact18:1,4,12;vit:1,4,12;mobilenet:1,4,12",
                    help="group: arch:sizes;... (the full suite's architectures at 32x32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    args = ap.parse_args(argv)
    if args.part == "_memory_child":
        print(json.dumps(memory_child(args.n, args.res, args.batch_size)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    sink: list[dict[str, Any]] = []
    started = machine()
    t0 = time.perf_counter()
    parts = ["qp", "head", "overhead", "memory"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "qp":
            spec = args.classes or "100,1000,10000"
            classes = [20, 60] if args.quick else [int(c) for c in spec.split(",")]
            bench_qp(classes, d=64 if args.quick else 2048, n_ref=32 if args.quick else 128,
                     sample=10 if args.quick else 200, sink=sink)
        elif part == "head":
            bench_head(n=8 if args.quick else 64, res=32 if args.quick else 64,
                       cvxpy_sample=0 if args.quick else 2, soft_sample=1 if args.quick else 3, sink=sink)
        elif part == "classes":
            spec = args.classes or "10,100,1000"
            bench_classes(classes=[3, 12] if args.quick else [int(c) for c in spec.split(",")],
                          res=32 if args.quick else 224, per_class=args.per_class, sink=sink,
                          out=args.out)
        elif part == "overhead":
            spec = "resnet18:10:32:64" if args.quick else args.overhead
            configs = [(m, int(c), int(r), int(n)) for m, c, r, n in (s.split(":") for s in spec.split(","))]
            bench_overhead(configs=configs, repeats=1 if args.quick else args.repeats,
                           batch_size=args.batch_size, device=args.device, sink=sink)
        elif part == "group":
            spec = "preact18-w8:1,4" if args.quick else args.group
            for item in spec.split(";"):
                arch, gs = item.split(":")
                for mode, steps in (("finetune", 20), ("train", 8)):
                    bench_group(arch=arch, sizes=[int(g) for g in gs.split(",")], mode=mode,
                                steps=2 if args.quick else steps, device=args.device, sink=sink)
        elif part == "memory":
            sizes = [100, 400] if args.quick else [int(s) for s in args.sizes.split(",")]
            bench_memory(sizes=sizes, res=16 if args.quick else args.res, batch_size=args.batch_size,
                         sink=sink)
    result = {"machine": started, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "seconds": time.perf_counter() - t0, "command": " ".join(["python -m benchmarks.scale",
                                                                          *(argv or sys.argv[1:])]),
              "results": sink}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
