"""Smoke test of the benchmark harness on the micro suite (2 models, 2 epochs, digits 16x16)."""

from __future__ import annotations

import json

import torch

from benchmarks import run


def _metrics(out: dict) -> list[float]:
    vals = []
    for rec in out["records"]:
        groups = [rec["metrics"], rec["ours_by_class"], rec["study"]]
        for m in [m for g in groups for m in g.values()]:
            if m is not None:
                vals += list(m.values())
    return vals


def test_micro_suite_end_to_end_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    try:
        out = run.main(["--suite", "micro", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                        "--quiet"])
        assert (tmp_path / "micro.json").exists() and (tmp_path / "micro.md").exists()
        assert out["counters"]["trained"] == 2 and out["n_backdoored"] == 1 and out["n_clean_models"] == 1
        vals = _metrics(out)
        assert vals and all(0.0 <= v <= 1.0 for v in vals)
        det = out["summary"]["detection"]
        assert "mad" in det and all(0 <= d["fpr"] <= 1 and 0 <= d["tpr"] <= 1 for d in det.values())
        t = out["summary"]["timings"]
        assert t["reference_pass"] > 0 and t["qp"] > 0 and t["plain_inference"] > 0
        md = (tmp_path / "micro.md").read_text()
        assert "`mad` (paper)" in md and "| ft |" in md and "| clp |" in md

        # second run: nothing is retrained or re-evaluated, the tables are rewritten from the cache
        (tmp_path / "micro.json").unlink()
        again = run.main(["--suite", "micro", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                          "--quiet"])
        # a finished evaluation is reused without loading (or needing) the weights
        assert again["counters"]["trained"] == 0 and again["counters"]["train_cached"] == 0
        assert again["counters"]["evaluated"] == 0 and again["counters"]["eval_cached"] == 2
        saved = json.loads((tmp_path / "micro.json").read_text())
        assert saved["summary"]["rows"][0]["none"] == out["summary"]["rows"][0]["none"]
    finally:
        torch.set_num_threads(threads)
