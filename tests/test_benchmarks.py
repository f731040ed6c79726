"""Smoke test of the benchmark harness on the micro suite (2 models, 2 epochs, digits 16x16)."""

from __future__ import annotations

import json

import torch

from benchmarks import rescore, run, stats


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
        spent = out["summary"]["spent"]  # where the time went, per phase
        assert spent["training"] > 0 and spent["fine-tunes (stacked)"] > 0 and spent["audit"] > 0
        assert spent["purification (purify())"] > 0
        # every defense ran on the backdoored model (the removal tables count working backdoors
        # only, and the micro zoo's one may stay below the 50 % ASR that makes one working)
        bd = next(r for r in out["records"] if r["spec"]["attack"])
        assert {"ft", "nc", "fst", "clp"} <= set(bd["metrics"])
        assert str(bd["spec"]["target"]) in bd["ours_by_class"]
        assert set(bd["study"]) == set(run.SUITES["micro"]["study"])
        md = (tmp_path / "micro.md").read_text()
        assert "`mad` (paper)" in md and "### Removal" in md

        # second run: nothing is retrained or re-evaluated, the tables are rewritten from the cache
        (tmp_path / "micro.json").unlink()
        again = run.main(["--suite", "micro", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                          "--quiet"])
        # a finished evaluation is reused without loading (or needing) the weights
        assert again["counters"]["trained"] == 0 and again["counters"]["train_cached"] == 0
        assert again["counters"]["evaluated"] == 0 and again["counters"]["eval_cached"] == 2
        saved = json.loads((tmp_path / "micro.json").read_text())
        assert [r["metrics"] for r in saved["records"]] == json.loads(
            json.dumps([r["metrics"] for r in out["records"]]))

        # the detection tables rebuilt from the stored statistics alone equal the run's
        (tmp_path / "cache").rename(tmp_path / "cache-gone")  # no model, no cached record
        det = rescore.main(["--suite", "micro", "--out", str(tmp_path), "--quiet"])
        want = out["summary"]["detection_standard"]
        assert {k: v for k, v in det.items() if k != "rescore_seconds"} == json.loads(json.dumps(want))
        assert "input-ratio" in det["rules"] and "neural cleanse (mask L1, MAD)" in det["rules"]
        assert det["rules"]["mad"]["n_clean"] == 1 and det["planted_triggers"] == 1
        assert "LOFO" in (tmp_path / "micro.md").read_text()

        # the calibration file pools trainings: a training written again replaces its own entry only
        cal = tmp_path / "cal.json"
        other = {"key": "another-training", "source": "x",
                 "rules": {"mad": {"clean_max": [9.0], "families": ["f"]}}}
        cal.write_text(json.dumps({"trainings": [other]}))
        zs = stats.load_all(tmp_path / "micro")
        clean = [z for z in zs if not z["spec"].get("targets")]
        for _ in range(2):
            rescore.write_calibration([(zs, "micro")], cal, suite="micro", detection=zs)
        entries = json.loads(cal.read_text())["trainings"]
        assert [e["key"] for e in entries] == ["another-training", rescore.training_key(clean)]
        assert len(entries[1]["rules"]["mad"]["clean_max"]) == 1  # the micro zoo's one clean model
    finally:
        torch.set_num_threads(threads)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_group_equals_one_by_one():
    """benchmarks.group: models stepped together by one vmapped step end where each would alone
    (the zoo's training with own data and seeds; the baselines' fine-tunes with their own learning
    rate and seed, NC's stamped trigger and FST's anchored, re-normed head)."""
    import numpy as np

    from benchmarks import baselines, core, group
    from benchmarks.models import build

    torch.manual_seed(0)
    X, Y = torch.randn(150, 1, 16, 16), torch.randint(0, 10, (150,))
    own = [(torch.randn(150, 1, 16, 16), torch.randint(0, 10, (150,))) for _ in range(2)]
    alone = []
    for i, (x, y) in enumerate(own):
        clf = build("preact18-w8", 10, 1, 16, seed=10 + i)
        losses = core.train_model(clf, x, y, epochs=2, lr=0.05, bs=64, seed=10 + i)
        alone.append((clf, losses))
    members = [group.Member(clf=build("preact18-w8", 10, 1, 16, seed=10 + i), lr=0.05, seed=10 + i, X=x, Y=y)
               for i, (x, y) in enumerate(own)]
    losses = group.fit(members, None, None, epochs=2, bs=64, nesterov=True)
    for i, ((clf, ref), m, got) in enumerate(zip(alone, members, losses)):  # float rounding differs
        np.testing.assert_allclose(got, ref, rtol=1e-3)
        moved = _max_diff(clf.model, build("preact18-w8", 10, 1, 16, seed=10 + i).model)
        assert _max_diff(clf.model, m.clf.model) < 1e-3 * moved

    src = alone[0][0]
    variants = [{"lr": 0.003}, {"lr": 0.01, "seed": 1}]
    mask, pattern = torch.zeros(1, 16, 16), torch.ones(1, 16, 16)
    mask[:, -4:, -4:] = 1
    members = [group.Member(clf=src.copy(), **v) for v in variants]
    rev = {"flagged": 0, "masks": mask[None], "patterns": pattern[None]}
    members.append(baselines.nc_unlearn(src.copy(), rev, lr=0.003))
    members.append(baselines.fst_member(src.copy(), lr=0.01))
    group.fit(members, X, Y, epochs=2, bs=64)
    refs = [group.Member(clf=src.copy(), **v) for v in variants]
    refs.append(baselines.nc_unlearn(src.copy(), rev, lr=0.003))
    refs.append(baselines.fst_member(src.copy(), lr=0.01))
    group.fit(refs, X, Y, epochs=2, bs=64, stacked=False)  # one by one: the reference loops
    refs = [m.clf for m in refs]
    for ref, m in zip(refs, members):
        moved = _max_diff(ref.model, src.model)
        assert moved > 1e-3 and _max_diff(ref.model, m.clf.model) < 1e-3 * moved
    # FST's head kept the original norm
    norm0 = float(src.model.linear.weight.detach().norm())
    assert abs(float(members[-1].clf.model.linear.weight.detach().norm()) - norm0) < 1e-4 * norm0
    # predicted together: the same metrics as one by one (a rounding tie may flip one sample)
    Xtr = X.clone()
    Xtr[:, :, -4:, -4:] = 1.0
    together = group.evaluate([m.clf for m in members], X, Y, Xtr, Y, 3)
    for m, got in zip(members, together):
        ref = core.evaluate(m.clf.model, X, Y, Xtr, Y, 3)
        assert set(got) == {"acc", "acc_target", "asr", "ra"}
        assert all(abs(got[k] - ref[k]) <= 1 / len(X) for k in ref)


def test_study_pick_needs_a_clear_paired_gain():
    """The purification study replaces the library default only by a variant that meets the goal
    as often and whose per-model DER gain exceeds two standard errors (on the purified weights, or
    on the guarded model where the weights' DER is no lower)."""
    models = [f"m{i}" for i in range(6)]
    base = {m: 0.80 + 0.02 * i for i, m in enumerate(models)}
    noisy = {m: v + (0.03 if i % 2 else -0.02) for i, (m, v) in enumerate(base.items())}  # +0.005 mean
    steady = {m: v + 0.02 for m, v in base.items()}  # +0.02 on every model
    ders = {run.DEFAULT_VARIANT: base, "noisy": noisy, "steady": steady}

    def study(goal: dict[str, int]) -> dict:
        return {n: {"der": float(sum(d.values()) / len(d)), "goal_met": goal[n]} for n, d in ders.items()}

    s = study({run.DEFAULT_VARIANT: 1, "noisy": 1, "steady": 1})
    assert run.pick(s, ders) == "steady"
    assert s["noisy"]["der_gain"] > 0 and s["noisy"]["der_gain"] < 2 * s["noisy"]["der_gain_se"]
    # a clear DER gain that meets the goal on fewer models does not replace the default
    assert run.pick(study({run.DEFAULT_VARIANT: 2, "noisy": 2, "steady": 1}), ders) == run.DEFAULT_VARIANT

    # the guarded model's pick moves the default only where the purified weights lose nothing
    s = study({run.DEFAULT_VARIANT: 1, "noisy": 1, "steady": 1})
    run.pick(s, {run.DEFAULT_VARIANT: base, "noisy": base, "steady": noisy})
    assert run.settle(s, run.DEFAULT_VARIANT, "steady") == "steady"  # +0.005 on the weights
    s["steady"]["der_gain"] = -0.001
    assert run.settle(s, run.DEFAULT_VARIANT, "steady") == run.DEFAULT_VARIANT
    assert run.settle(s, "noisy", "steady") == "noisy"  # the weights' own pick comes first


def test_nc_reverse_stacked_equals_alone():
    """Neural Cleanse's reverse engineering of several models in one vmapped step per iteration
    ends where each model's own run does (Adam turns rounding of tiny gradients into lr-sized
    moves, so the mask norms agree to 1e-3, not to the last digit)."""
    import numpy as np

    from benchmarks import baselines
    from benchmarks.models import build

    torch.manual_seed(0)
    X = torch.randn(60, 1, 16, 16)
    clfs = [build("preact18-w8", 10, 1, 16, seed=i) for i in range(3)]
    stacked = baselines.nc_reverse_many(clfs, X, steps=5, bs=4, seeds=[1, 2, 3])
    alone = [baselines.nc_reverse(c, X, steps=5, bs=4, seed=s) for c, s in zip(clfs, [1, 2, 3])]
    for a, b in zip(stacked, alone):
        np.testing.assert_allclose(a["l1"], b["l1"], rtol=1e-3)
        assert a["masks"].shape == b["masks"].shape == (10, 1, 16, 16)
        assert float((a["patterns"] - b["patterns"]).abs().max()) < 0.05  # patterns live in [-1, 1]
    # each model kept its own seed: another seed starts from other patterns
    other = baselines.nc_reverse(clfs[0], X, steps=5, bs=4, seed=9)
    assert float((other["patterns"] - stacked[0]["patterns"]).abs().max()) > 0.1


def test_suite_sets_its_own_attack_parameters_and_rates():
    cfg = run.SUITES["standard"]
    specs = run.model_specs(cfg)
    wanet = sorted(s["rate"] for s in specs if s["attack"] == "wanet")
    assert wanet == sorted(cfg["attack_rates"]["wanet"] * len(run.STANDARD_ARCHS))
    assert {s["rate"] for s in specs if s["attack"] == "badnets"} == {0.05, 0.1}
    # the parameters reach the attack, and change the cache key of that attack's models only
    runner = run.Runner.__new__(run.Runner)
    runner.cfg = cfg
    runner.data = type("D", (), {"size": 32})()
    atk = runner.attack("wanet")
    assert (atk.s, atk.cross) == (cfg["attack_kw"]["wanet"]["s"], cfg["attack_kw"]["wanet"]["cross"])
    w = next(s for s in specs if s["attack"] == "wanet")
    b = next(s for s in specs if s["attack"] == "badnets")
    plain = dict(cfg, attack_kw={})
    other = run.Runner.__new__(run.Runner)
    other.cfg = plain
    assert runner.train_hash(w) != other.train_hash(w)
    assert runner.train_hash(b) == other.train_hash(b)


def test_worker_shares_split_every_family_evenly():
    from collections import Counter

    specs = run.model_specs(run.SUITES["standard"])
    shares = [run.share(specs, i, 2) for i in range(2)]
    assert sorted(m["id"] for sh in shares for m in sh) == sorted(m["id"] for m in specs)
    for key in ("arch", "attack"):  # per family, and backdoored / clean within it
        counts = [Counter((m["arch"], bool(m[key])) for m in sh) for sh in shares]
        assert all(abs(counts[0][k] - counts[1][k]) <= 1 for k in counts[0] | counts[1])
    # a share keeps the zoo's interleaved order (a deadline leaves every family partly done)
    order = {m["id"]: i for i, m in enumerate(specs)}
    assert all([order[m["id"]] for m in sh] == sorted(order[m["id"]] for m in sh) for sh in shares)
    assert {m["arch"] for m in shares[0][:4]} == set(run.STANDARD_ARCHS)


def test_head_blind_to_s_t_ignores_that_direction_and_keeps_the_mean():
    from benchmarks import baselines
    from benchmarks.models import build

    torch.manual_seed(0)
    clf = build("preact18-w8", 4, 1, 16, 0)
    X = torch.randn(32, 1, 16, 16)
    s_t = torch.randn(clf.embed_dim).numpy()
    with torch.no_grad():
        h = clf.forward(X)[1]
    blind = baselines.erase_direction(clf.copy(), s_t, X)
    W, b = (torch.as_tensor(a).double() for a in blind.head_numpy())
    u = torch.as_tensor(s_t).double() / float(torch.as_tensor(s_t).norm())
    assert float((W @ u).abs().max()) < 1e-4  # moving along s_t changes no logit
    W0, b0 = (torch.as_tensor(a).double() for a in clf.head_numpy())
    mu = h.mean(0).double()
    assert torch.allclose(W @ mu + b, W0 @ mu + b0, atol=1e-4)  # the clean mean's logits stay


def test_benchmark_purifies_through_purify(tmp_path):
    """The benchmark's purified model of a zoo model (ours, and FT) is the one hub_backdoor.purify
    returns for the same model, seed and data, called as a user would: library defaults, the true
    target, the audit's s_t in the report, the clean set as an (images, labels) pair."""
    import hub_backdoor
    from benchmarks import core

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = run.Runner("micro", torch.device("cpu"), tmp_path, log=False)
        spec = next(s for s in run.model_specs(runner.cfg) if s["attack"])
        clf, _ = runner.trained(spec)
        au = core.audit(clf, runner.Xc, runner.Yc)
        report = run.zoo_report(clf, au.perturbations, au.inp.norms)
        t = spec["target"]
        before = {k: v.clone() for k, v in clf.model.state_dict().items()}
        data = (runner.Xc, runner.Yc)
        ours = runner.purified(spec, clf, report, run.OURS, t)
        want = hub_backdoor.purify(clf, data, report=report, target=t, holdout=0.0,
                                   epochs=runner.cfg.get("ours_epochs"), progress=False)
        ft = runner.purified(spec, clf, report, run.FT, t, epochs=runner.cfg["ft_epochs"])
        want_ft = hub_backdoor.purify(clf, data, report=report, target=t, holdout=0.0, beta=0.0, distill=0.0,
                                      keep=0.0, train="all", epochs=runner.cfg["ft_epochs"], progress=False)
    finally:
        torch.set_num_threads(threads)
    for got, ref in ((ours, want.classifier), (ft, want_ft.classifier)):
        sd, sr = got.model.state_dict(), ref.model.state_dict()
        assert sd.keys() == sr.keys() and all(torch.equal(sd[k], sr[k]) for k in sd)
        assert any(not torch.equal(sd[k], before[k]) for k in sd)  # it did train
    assert all(torch.equal(v, before[k]) for k, v in clf.model.state_dict().items())  # the zoo's model stays


def test_many_class_family_joins_the_standard_statistics():
    """The standard zoo's 100-class family: its own suite (its own data), targets among its 100
    classes, statistics in the standard folder, which rescore counts as one more family; the
    10-class families' targets are those their stored statistics were made with."""
    from pathlib import Path

    import numpy as np

    cfg = run.SUITES["standard-c100"]
    specs = run.model_specs(cfg)
    assert cfg["stats"] == run.SUITES["standard"]["stats"] and cfg["num_classes"] == 100
    assert {s["arch"] for s in specs} == set(cfg["zoo"])
    bd = [s for s in specs if s["attack"]]
    assert len(bd) == 6 and len(specs) - len(bd) == cfg["n_clean"]
    assert all(0 <= s["target"] < 100 for s in bd) and any(s["target"] >= 10 for s in bd)
    assert cfg in rescore.stored_with("standard") and rescore.stored_with("micro") == [run.SUITES["micro"]]
    # the 10-class zoo keeps its targets (and so its cache keys and committed statistics)
    stored = Path(run.__file__).parent / "results" / "standard"
    ten = {s["id"]: s["targets"] for s in run.model_specs(run.SUITES["standard"])}
    for path in sorted(stored.glob("*badnets-10pct.npz")) + sorted(stored.glob("*two-*.npz")):
        with np.load(path) as z:
            spec = json.loads(str(z["spec"]))
        if spec["id"] in ten:
            assert spec["targets"] == ten[spec["id"]]


def test_curve_bounds_of_a_partial_search_map_to_their_classes():
    """Above 32 classes the input search covers some of them; the stored curves are per searched
    class and rescore's curve-based scores place them back among all C (nan elsewhere)."""
    import numpy as np

    eps = np.array([0.5, 1.0, 2.0])
    curves = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    z = {"eps": eps, "flip_curve": curves, "norms": np.ones(5), "input_classes": np.array([1, 3])}
    b = rescore._curve_bound(z, 0.5)
    assert b.shape == (5,) and np.isnan(b[[0, 2, 4]]).all() and 0.5 < b[1] < b[3] <= 2.0
    full = rescore._curve_bound({"eps": eps, "flip_curve": curves}, 0.5)  # every class searched
    assert np.allclose(full, b[[1, 3]])


def test_screen_study_restricts_the_search_to_the_screen_s_top_classes():
    """benchmarks.screen keeps the bounds of the latent screen's top k classes only (the classes the
    audit would search with verify_top=k), nan elsewhere, and a planted low bound on a screened
    class is found at every k that covers it."""
    import numpy as np

    from benchmarks import screen
    from hub_backdoor.detection.audit import screened_classes

    rng = np.random.default_rng(0)
    C, d = 40, 8
    norms = rng.uniform(1.0, 2.0, C)
    z = {"norms": norms, "nonneg_norms": norms, "quantile_norms": norms,
         "perturbations": rng.normal(size=(C, d)), "h_std": np.ones(d),
         "input_bounds": rng.uniform(20.0, 30.0, C),
         "spec": {"id": "m", "targets": []}, "record": {}}
    z["logits"] = rng.normal(size=(50, C))
    z["labels"] = rng.integers(0, C, 50)
    for k in (4, 8):
        inp = screen.restricted(z, k)
        kept = np.flatnonzero(np.isfinite(inp.input_bounds))
        assert kept.tolist() == screened_classes(norms, z["perturbations"], z["h_std"], top=k)
    top4 = screened_classes(norms, z["perturbations"], z["h_std"], top=4)
    z["input_bounds"][top4[0]] = 1.0  # a shortcut far below every other class
    z["spec"], z["record"] = {"id": "m", "targets": [top4[0]]}, {"asr_by_trigger": [1.0]}
    res = screen.study([z], tops=(4, 8))
    assert [res["summary"][k]["input_found"] for k in ("4", "8")] == [1, 1]
