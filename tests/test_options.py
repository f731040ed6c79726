"""Every audit option is declared once (hub_backdoor.options.AuditOptions) and reaches every front end
with the library's default: Python, the command line, the [tool.hub-backdoor] config and the hook, the
GitHub Action and the webhook. Every purification option is declared once too
(hub_backdoor.options.PurifyOptions) and reaches Python, the command line, the card's Reproduce line,
the config file's purify sub-table and the webhook with the library's default."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

import hub_backdoor
from hub_backdoor import integrations
from hub_backdoor.cli import build_parser
from hub_backdoor.defaults import PURIFY
from hub_backdoor.detection import rules as detection
from hub_backdoor.errors import OptionError
from hub_backdoor.options import AuditOptions, PurifyOptions

ROOT = Path(__file__).resolve().parent.parent
FIELDS = dataclasses.fields(AuditOptions)

#: a value away from each option's default, valid for a check
OTHER = {"image_column": "img", "label_column": "y", "max_samples": 7, "seed": 3, "batch_size": 5,
         "threshold": 1.5, "rule": "mad", "soft_margin": 2.0, "margin": 0.1, "solver": "cvxpy",
         "verify_top": 3, "verify_images": 9, "min_reference_accuracy": 0.4, "min_class_samples": 2,
         "device": "cpu", "streaming": True}


def test_every_option_has_a_value_to_try():
    assert set(OTHER) == set(AuditOptions.names())
    for f in FIELDS:
        assert OTHER[f.name] != f.default, f.name
    AuditOptions(**OTHER).check()


@pytest.mark.parametrize("f", [f for f in FIELDS if f.metadata["audit"]], ids=lambda f: f.name)
def test_python_default_is_the_audit_s(f):
    assert inspect.signature(hub_backdoor.audit).parameters[f.name].default == f.default


def test_the_loading_options_are_the_rest():
    # what is not an audit() keyword says how the data is loaded (jobs.load_inputs reads it)
    assert [f.name for f in FIELDS if not f.metadata["audit"]] == ["streaming"]


def _subparser(command: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command]


@pytest.mark.parametrize("command", ["audit", "purify"])
def test_command_line_flags_and_defaults(command):
    args = _subparser(command).parse_args(["org/m"])
    for f in FIELDS:
        # None: the library default, which the flag shows (read now: the tests may set it)
        want = detection.DEFAULT_RULE if f.name == "rule" else f.default
        assert getattr(args, f.name) == want, f.name
    argv = ["org/m"] + AuditOptions(**OTHER).to_flags()
    parsed = AuditOptions.from_args(_subparser(command).parse_args(argv))
    assert parsed == AuditOptions(**OTHER)


def test_config_file_and_hook(tmp_path):
    lines = ["[tool.hub-backdoor]"]
    for name, value in OTHER.items():
        text = f'"{value}"' if isinstance(value, str) else str(value).lower()  # TOML: true
        lines.append(f"{name.replace('_', '-')} = {text}")
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    config = integrations.read_config(tmp_path / "pyproject.toml")
    assert AuditOptions.from_mapping(config) == AuditOptions(**OTHER)
    # the hook takes each as a flag too, and turns the config back into audit flags
    hook = integrations._hook_parser().parse_args(integrations.audit_options(config))
    assert AuditOptions.from_mapping({f.name: getattr(hook, f.name) for f in FIELDS}) == AuditOptions(**OTHER)


def test_webhook_config():
    from integrations.hub_webhook.service import AUDIT_OPTIONS, Config, parse_audit_options

    specs = [f"{k}={v}" for k, v in OTHER.items() if k in AUDIT_OPTIONS]
    config = Config(secret="s", repos=["o/*"], audit_options=parse_audit_options(specs),
                    threshold=OTHER["threshold"], max_samples=OTHER["max_samples"])
    assert config.options() == AuditOptions(**OTHER)
    assert Config(secret="s", repos=["o/*"]).options() == AuditOptions()


def test_action_passes_options_through_and_keeps_the_rule_s_threshold():
    action = yaml.safe_load((ROOT / "integrations" / "github-action" / "action.yml").read_text())
    assert action["inputs"]["threshold"]["default"] == ""  # empty: the rule's own
    # `args:` goes to the same parser as `hub-backdoor audit`
    argv = ["org/m"] + AuditOptions(**OTHER).to_flags()
    assert AuditOptions.from_args(integrations._audit_parser().parse_args(argv)) == AuditOptions(**OTHER)


def test_an_unknown_option_is_named():
    with pytest.raises(OptionError, match="verify_topp"):
        AuditOptions.from_mapping({"verify_topp": 3})


def test_purify_defaults_are_the_library_s():
    params = inspect.signature(hub_backdoor.purify).parameters
    args = _subparser("purify").parse_args(["org/m", "--out", "x"])
    for key, value in PURIFY.items():
        if key == "min_steps":  # not an option: how epochs=None is resolved
            continue
        assert params[key].default == (None if key == "epochs" else value), key
        # None: the library's (epochs: enough for min_steps; threads: the runtime flag, unset)
        assert getattr(args, key) == (None if key in ("epochs", "threads") else value), key
    assert params["holdout"].default == args.holdout


# -- purification -----------------------------------------------------------------------------------------
PFIELDS = dataclasses.fields(PurifyOptions)

#: a value away from each purification option's default, valid for a check
POTHER = {"epochs": 4, "beta": 5.0, "scale": 1.5, "distill": 0.5, "keep": 2.0, "target_weight": 2.0,
          "lr": 0.01, "warmup": 0.25, "holdout": 0.3, "train": "all", "sam_rho": 0.05, "sam_adaptive": True,
          "augment": True, "max_accuracy_drop": 0.02, "threads": 3, "resolve_every": 2, "freeze_norm": True}


def test_every_purify_option_has_a_value_to_try():
    assert set(POTHER) == set(PurifyOptions.names())
    for f in PFIELDS:
        assert POTHER[f.name] != f.default, f.name
    PurifyOptions(**POTHER).check()
    with pytest.raises(OptionError, match="beta"):
        PurifyOptions(beta=-1.0).check()


@pytest.mark.parametrize("f", PFIELDS, ids=lambda f: f.name)
def test_python_default_is_the_purify_s(f):
    assert inspect.signature(hub_backdoor.purify).parameters[f.name].default == f.default


def test_purify_defaults_come_from_the_defaults_module():
    d = PurifyOptions()
    for key, value in PURIFY.items():
        if key in ("epochs", "min_steps"):  # epochs=None: PURIFY["epochs"], or enough for min_steps
            continue
        assert getattr(d, key) == value, key
    assert d.epochs is None


def test_purify_command_line_flags_and_defaults():
    args = _subparser("purify").parse_args(["org/m", "--out", "x"])
    assert PurifyOptions.from_args(args) == PurifyOptions()
    assert args.threads is None  # the runtime flag: unset is purify's own count
    argv = ["org/m", "--out", "x"] + PurifyOptions(**POTHER).to_flags()
    assert PurifyOptions.from_args(_subparser("purify").parse_args(argv)) == PurifyOptions(**POTHER)


def test_purify_options_reach_the_library_through_the_workflow(monkeypatch):
    from hub_backdoor import jobs

    seen = {}

    def fake(*args, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(jobs, "purify_model", fake)
    from types import SimpleNamespace

    opts = PurifyOptions(**POTHER)
    model = SimpleNamespace(clf=None)
    with pytest.raises(RuntimeError, match="stop"):
        jobs._fine_tune(model, None, None, 0, AuditOptions(), opts, eval_trigger=None,  # type: ignore[arg-type]
                        say=jobs.Silent())
    assert {k: seen[k] for k in PurifyOptions.names()} == POTHER


def test_reproduce_line_names_every_purify_option():
    from types import SimpleNamespace

    from hub_backdoor.outputs.publish import purify_flags

    params = {**POTHER, "epochs": 4, "batch_size": 64, "determinism": "cpu-fixed-threads"}
    result = SimpleNamespace(params=params, target=1, report=SimpleNamespace(target=1))
    argv = ["org/m", "--out", "x"] + purify_flags(result)  # type: ignore[arg-type]
    assert PurifyOptions.from_args(_subparser("purify").parse_args(argv)) == PurifyOptions(**POTHER)
    default = {**dataclasses.asdict(PurifyOptions()), "epochs": 10, "batch_size": 64,
               "determinism": "cpu-fixed-threads"}
    result = SimpleNamespace(params=default, target=1, report=SimpleNamespace(target=1))
    assert purify_flags(result) == ["--epochs", "10"]  # type: ignore[arg-type]


def test_purify_webhook_config():
    from integrations.hub_webhook.service import PURIFY_OPTIONS, Config, parse_purify_options

    specs = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in POTHER.items()
             if k in PURIFY_OPTIONS]
    config = Config(secret="s", repos=["o/*"], purify_options=parse_purify_options(specs),
                    purify_epochs=POTHER["epochs"], max_accuracy_drop=POTHER["max_accuracy_drop"])
    assert config.purification() == PurifyOptions(**POTHER)
    assert Config(secret="s", repos=["o/*"]).purification() == PurifyOptions()


def test_an_unknown_purify_option_is_named():
    with pytest.raises(OptionError, match="betaa"):
        PurifyOptions.from_mapping({"betaa": 3})


def _toml(value):
    return f'"{value}"' if isinstance(value, str) else str(value).lower()  # TOML: true


def _config_file(tmp_path, audit, purify, name="hub-backdoor.toml"):
    lines = ["[tool.hub-backdoor]"] + [f"{k.replace('_', '-')} = {_toml(v)}" for k, v in audit.items()]
    lines += ["[tool.hub-backdoor.purify]"] + [f"{k} = {_toml(v)}" for k, v in purify.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _points(options):
    # the file takes the flags' values: max-accuracy-drop in points
    return {k: 100 * v if k == "max_accuracy_drop" else v for k, v in options.items()}


def test_config_file_sets_every_audit_and_purify_option_of_the_commands(tmp_path):
    from hub_backdoor.cli.app import parse_args

    path = _config_file(tmp_path, OTHER, _points(POTHER))
    args = parse_args(build_parser(), ["purify", "org/m", "--out", "x", "--config", str(path)])
    assert AuditOptions.from_args(args) == AuditOptions(**OTHER)
    assert PurifyOptions.from_args(args) == PurifyOptions(**POTHER)
    args = parse_args(build_parser(), ["audit", "org/m", "--config", str(path)])
    assert AuditOptions.from_args(args) == AuditOptions(**OTHER)
    # an empty table keeps every default; a flag on the command line wins over the file
    empty = _config_file(tmp_path, {}, {}, "empty.toml")
    args = parse_args(build_parser(), ["purify", "org/m", "--out", "x", "--config", str(empty)])
    assert PurifyOptions.from_args(args) == PurifyOptions()
    assert AuditOptions.from_args(args) == AuditOptions(rule=detection.DEFAULT_RULE)
    argv = ["purify", "org/m", "--config", str(path), "--beta", "7", "--seed", "9"]
    args = parse_args(build_parser(), argv)
    assert (args.beta, args.seed, args.scale) == (7.0, 9, POTHER["scale"])


def test_a_bad_config_file_is_a_usage_error(tmp_path, capsys):
    from hub_backdoor.cli import main

    path = _config_file(tmp_path, {}, {"betaa": 1.0})
    assert main(["purify", "org/m", "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    assert "unknown key 'betaa' in [tool.hub-backdoor.purify]" in capsys.readouterr().err
    path = _config_file(tmp_path, {}, {"epochs": "many"})
    assert main(["purify", "org/m", "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    assert "'epochs' must be an integer" in capsys.readouterr().err
    path = _config_file(tmp_path, {}, {"train": "heads"})  # the flag's choices hold in the file too
    assert main(["purify", "org/m", "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    assert "'train' must be one of backbone, last-stage, all" in capsys.readouterr().err
    assert main(["audit", "org/m", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
